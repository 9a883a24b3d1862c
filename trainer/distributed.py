"""Every distributed concern of the trainer: process group, devices, seeds, wrapping, precision,
reductions, checkpoints. The rest of the trainer never names a backend or a rank.

The trainer drives two ``Update``s (E alone; G and T together on one loss) through a small
interface: ``nets`` for the update's own forward, ``modules`` for bare networks, ``backward``,
``step`` (which reports a skipped step) and ``penalty_scale``. ``Runtime`` implements it with
accelerate + DDP; ``trainer/deepspeed_runtime.py`` with one DeepSpeed engine per update.

Mixed precision is owned here, not by accelerate: accelerate silently turns fp16 off on CPU (no
GradScaler, autocast left in fp32), so the runtime runs ``torch.autocast`` and, for fp16, a
``torch.amp.GradScaler`` itself. fp16 is then real wherever torch supports it (CUDA, and CPU).

Checkpoints are written by every rank into ``checkpoints/step_XXXXXXXX.partial`` and renamed to
their final name by the main process only after all ranks finished, so a crash during a save never
leaves a checkpoint that loads half; a ``.partial`` folder is ignored and cleaned up later.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


class LaunchError(RuntimeError):
    pass


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The penalty's inner autograd.grad starts from d(scale * sum_i E_i)/dE_i = scale for every sample, in
# E's fp16 output dtype: 2**16 (GradScaler's default) is inf in fp16 (max 65504), so start at 2**15.
FP16_INIT_SCALE = 2.0**15


class Update:
    """One MEG update as the trainer drives it (DDP flavour): its networks, one optimizer, one loss.

    ``nets[name]`` is what the update's own forward calls (the DDP wrapper: it all-reduces the
    gradients); ``modules[name]`` is the bare network, for the other update and for evaluation.
    Nothing here reads a value back to the host: the loss scale and the skip flag stay on the device.
    """

    def __init__(
        self,
        nets: dict[str, nn.Module],
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,  # disabled unless fp16
        device: torch.device,
    ):
        self.nets, self.modules, self.optimizer, self.scaler = nets, modules, optimizer, scaler
        self._params = [p for net in nets.values() for p in net.parameters() if p.requires_grad]
        self._not_skipped = torch.zeros((), device=device)
        if scaler.is_enabled():
            scaler.scale(torch.zeros((), device=device))  # creates the scale tensor on the device now

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _scale(self) -> torch.Tensor:
        # The scaler's own device tensor: its public get_scale() reads it with .item(), a host sync.
        return self.scaler._get_scale_async()

    def penalty_scale(self) -> float | torch.Tensor:
        """The loss scale, for the gradient penalty's inner autograd.grad (1.0 unless fp16)."""
        return self._scale() if self.scaler.is_enabled() else 1.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        # inputs=: the loss reaches the data batch too (it required grad for the penalty); only the
        # parameters' gradients are wanted.
        self.scaler.scale(loss).backward(inputs=self._params)

    def step(self) -> torch.Tensor:
        """Applies the step; returns 1.0 when it was skipped (fp16: inf/NaN gradients), else 0.0."""
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return self._not_skipped
        # With a fused optimizer GradScaler skips an overflowing step on the device, and update()
        # then lowers the scale: a lower scale is the sign of a skipped step.
        before = self._scale().clone()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return (self._scale() < before).float()


class Runtime:
    """Wraps an ``Accelerator`` (DDP, or one process): one per process."""

    def __init__(self, mixed_precision: str = "no"):
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise LaunchError(
                "accelerate was launched with distributed_type DEEPSPEED; this trainer drives DeepSpeed itself "
                "(one engine per update). Launch with a MULTI_GPU config (deploy/deepspeed/) and set "
                "train.engine=deepspeed."
            )
        if mixed_precision not in ("no", *AUTOCAST_DTYPES):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        self.mixed_precision = mixed_precision
        # Precision is handled here (autocast, GradScaler), so accelerate is told "no".
        self.accelerator = Accelerator(mixed_precision="no")
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != expected:
            # accelerate on a machine without a GPU starts unconnected processes unless told to use the CPU.
            raise LaunchError(
                f"WORLD_SIZE={expected} but this process joined a group of {self.accelerator.num_processes}: "
                "the processes did not form one group. On CPU launch with "
                "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (or torchrun)."
            )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    def seed(self, seed: int, per_rank: bool) -> None:
        """The same seed everywhere (network init), or seed + rank (noise, negatives)."""
        set_seed(seed + (self.rank if per_rank else 0))

    def prepare_updates(
        self,
        energy: nn.Module,
        generator: nn.Module,
        statistics: nn.Module,
        energy_opt: torch.optim.Optimizer,
        generator_opt: torch.optim.Optimizer,
    ) -> tuple[Update, Update]:
        """The energy update (E) and the generator update (G and T on one optimizer)."""
        wrapped = self.accelerator.prepare(energy, generator, statistics, energy_opt, generator_opt)
        e, g, t, e_opt, g_opt = wrapped
        updates = []
        for nets, opt in (({"energy": e}, e_opt), ({"generator": g, "statistics": t}, g_opt)):
            scaler = torch.amp.GradScaler(
                self.device.type, init_scale=FP16_INIT_SCALE, enabled=self.mixed_precision == "fp16"
            )
            if scaler.is_enabled():
                self.register_for_checkpointing(scaler)
            # GradScaler gets the torch optimizer itself: accelerate's wrapper hides that the fused
            # Adam can skip an overflowing step on the device, and GradScaler would then sync.
            bare = {k: self.accelerator.unwrap_model(v) for k, v in nets.items()}
            updates.append(Update(nets, bare, getattr(opt, "optimizer", opt), scaler, self.device))
        return updates[0], updates[1]

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self, cache: bool = True):
        """Mixed-precision region for every forward of the three updates (a no-op in fp32). ``cache``
        False: no weight-cast cache (required inside a CUDA graph capture)."""
        dtype = AUTOCAST_DTYPES.get(self.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)

    def for_evaluation(self, module: nn.Module) -> nn.Module:
        """The network as evaluation and sampling should see it (fp32 weights)."""
        return module

    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="mean") if self.world_size > 1 else values

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.world_size > 1 else values

    def ranks_in_sync(self, *modules: nn.Module) -> bool:
        """True when every rank holds bit-identical parameters and buffers (one small all-gather)."""
        if self.world_size == 1:
            return True
        digest = torch.stack(
            [
                torch.stack(
                    [
                        t.detach().double().sum(),
                        t.detach().double().abs().sum(),
                        (t.detach().double().flatten() * torch.arange(t.numel(), device=t.device)).sum(),
                    ]
                )
                for m in modules
                for t in [*m.parameters(), *m.buffers()]
                if t.is_floating_point()
            ]
        )
        gathered = self.accelerator.gather(digest.unsqueeze(0))
        return bool((gathered == gathered[0:1]).all())

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def register_for_checkpointing(self, *objects) -> None:
        self.accelerator.register_for_checkpointing(*objects)

    def save_checkpoint(self, checkpoint_dir: str, step: int, keep: int) -> str:
        """Every rank calls this (sharded engines need it). Returns the final folder."""
        final = os.path.join(checkpoint_dir, f"step_{step:08d}")
        partial = final + ".partial"
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        self.barrier()
        self._save_state(partial)
        self.barrier()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def _save_state(self, folder: str) -> None:
        self.accelerator.save_state(folder)

    def load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path)

    def shutdown(self) -> None:
        # gloo aborts a process at exit ("terminate called without an active exception") when the
        # group is torn down while something still holds it or another rank is still talking:
        # drop accelerate's references to the wrapped models first, then meet, then destroy.
        self.accelerator.free_memory()
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def build_runtime(cfg) -> Runtime:
    """The runtime that ``cfg.train.engine`` names (``cfg`` is a ``RunConfig``)."""
    if cfg.train.engine == "deepspeed":
        from trainer.deepspeed_runtime import DeepSpeedRuntime  # deepspeed is slow to import

        return DeepSpeedRuntime(cfg.train.mixed_precision, cfg.deepspeed, cfg.data.batch_size)
    return Runtime(cfg.train.mixed_precision)


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(n for n in os.listdir(checkpoint_dir) if CHECKPOINT_RE.match(n))
    return [os.path.join(checkpoint_dir, n) for n in names]


def checkpoint_step(path: str) -> int:
    m = CHECKPOINT_RE.match(os.path.basename(path.rstrip("/")))
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` take no gradient inside the block (the networks not being updated)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
