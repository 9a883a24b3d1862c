"""Every distributed concern of the trainer, behind one interface; the rest never names a backend.

- ``group.py``: the process-group services both runtimes share (rank, device, seeds, autocast,
  reductions, all-gather, barrier, the rank-sync check);
- ``ddp.py``: accelerate + DDP, with this project's mixed precision (autocast, GradScaler);
- ``deepspeed_engine.py``: one DeepSpeed engine per update (ZeRO 0/1/2);
- ``fsdp.py``: FSDP2, E, G and T sharded per layer, the penalty's double backward exact.

The trainer drives two ``Update``s (E alone; G and T together on one loss) and asks the runtime for
the checkpoint's pieces: ``fp32_state_dicts`` (the engine-free weights export), ``save_engine_state``
and ``restore``. The checkpoint layout itself lives in trainer/checkpoint.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from trainer.runtime.ddp import DDPRuntime, DDPUpdate
from trainer.runtime.group import (
    AUTOCAST_DTYPES,
    FP16_INIT_SCALE,
    CollectiveError,
    LaunchError,
    ProcessGroup,
    collective_failure,
    frozen,
    report_failure,
    reported_failure,
)


class Update(Protocol):
    """One MEG update: the networks its forward calls (``nets``: a DDP wrapper, or the bare module
    under DeepSpeed), the bare networks (``modules``), one optimizer, one loss."""

    nets: dict[str, nn.Module]
    modules: dict[str, nn.Module]

    @property
    def param_groups(self) -> list[dict]: ...

    def penalty_scale(self) -> float | torch.Tensor:
        """The fp16 loss scale for the penalty's inner autograd.grad (1.0 otherwise), without a host sync."""

    def zero_grad(self) -> None: ...

    def discard_step(self) -> None:
        """Forgets a step begun and never applied (a failed CUDA graph capture): gradients, scaler state."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor:
        """Applies the step; a 0-dim device tensor, 1.0 when the step was skipped (fp16 overflow)."""


class Runtime(Protocol):
    device: torch.device
    rank: int
    world_size: int
    is_main: bool

    def seed(self, seed: int, per_rank: bool) -> None: ...
    def fork_rng(self, seed: int | None = None): ...
    def autocast(self, cache: bool = True): ...
    def prepare_updates(self, energy, generator, statistics, energy_opt, generator_opt) -> tuple[Update, Update]: ...
    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor: ...
    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, values: torch.Tensor) -> torch.Tensor: ...
    def barrier(self) -> None: ...
    def wait_for_main(self, timeout: float, failed: bool = False) -> bool: ...
    def ranks_in_sync(self, *modules: nn.Module) -> bool: ...
    def for_evaluation(self, module: nn.Module) -> nn.Module:
        """The network as evaluation sees it: its fp32 weights (collective: every rank calls it)."""

    def fp32_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]: ...
    def save_engine_state(self, folder: str) -> None: ...
    def restore(self, folder: str, weights: dict[str, dict[str, torch.Tensor]]) -> None: ...
    def shutdown(self, meet: bool = True) -> None: ...


def build_runtime(cfg) -> Runtime:
    """The runtime that ``cfg.train.engine`` names (``cfg`` is a ``RunConfig``)."""
    if cfg.train.engine == "deepspeed":
        from trainer.runtime.deepspeed_engine import DeepSpeedRuntime  # deepspeed is slow to import

        return DeepSpeedRuntime(
            cfg.train.mixed_precision, cfg.deepspeed, cfg.data.batch_size, cfg.train.collective_timeout
        )
    if cfg.train.engine == "fsdp":
        from trainer.runtime.fsdp import FSDPRuntime

        return FSDPRuntime(cfg.train.mixed_precision, cfg.train.collective_timeout)
    return DDPRuntime(cfg.train.mixed_precision, cfg.train.collective_timeout)


__all__ = [
    "AUTOCAST_DTYPES",
    "CollectiveError",
    "DDPRuntime",
    "DDPUpdate",
    "FP16_INIT_SCALE",
    "LaunchError",
    "ProcessGroup",
    "Runtime",
    "Update",
    "build_runtime",
    "collective_failure",
    "frozen",
    "report_failure",
    "reported_failure",
]
