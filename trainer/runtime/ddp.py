"""The accelerate + DDP runtime: accelerate forms the process group and wraps the updating networks in
DistributedDataParallel; mixed precision (autocast, and GradScaler for fp16) is driven here, because
accelerate silently turns fp16 off on a CPU (no GradScaler, autocast left in fp32).

Engine state in a checkpoint: both optimizers and the fp16 loss scalers, written by the main process
(DDP keeps them identical on every rank) with torch.save and read back with ``weights_only=True``. The
networks themselves come from the checkpoint's engine-free weights export.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from torch.amp.grad_scaler import _refresh_per_optimizer_state
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.cli import CheckpointError
from trainer.runtime.group import FP16_INIT_SCALE, ProcessGroup, check_world_size, refuse_accelerate_deepspeed

log = logging.getLogger(__name__)

ENGINE_FILE = "ddp_state.pt"


class DDPUpdate:
    """One MEG update: its networks, one optimizer, one loss. ``nets[name]`` is what the update's own
    forward calls (the DDP wrapper: it all-reduces the gradients); ``modules[name]`` is the bare
    network, for the other update and for evaluation. Nothing here reads a value back to the host:
    the loss scale and the skip flag stay on the device."""

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

    def discard_step(self) -> None:
        """Forgets a step that was begun and never applied (a CUDA graph capture that failed midway):
        its gradients, and GradScaler's note that this optimizer has stepped since its last update()
        (left, the next step() would raise instead of running)."""
        self.zero_grad()
        if self.scaler.is_enabled():
            self.scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

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


class DDPRuntime(ProcessGroup):
    """One per process: accelerate's process group and DDP wrappers, this project's precision."""

    def __init__(self, mixed_precision: str = "no", collective_timeout: float | None = None):
        refuse_accelerate_deepspeed()
        # Precision is handled here (autocast, GradScaler), so accelerate is told "no". The group's
        # timeout bounds every collective (train.collective_timeout; torch's default is 30 minutes).
        handlers = (
            []
            if collective_timeout is None
            else [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))]
        )
        self.accelerator = Accelerator(mixed_precision="no", kwargs_handlers=handlers)
        check_world_size(self.accelerator.num_processes)
        acc = self.accelerator
        super().__init__(acc.device, acc.process_index, acc.num_processes, mixed_precision)
        self.updates: dict[str, DDPUpdate] = {}

    def prepare_updates(
        self,
        energy: nn.Module,
        generator: nn.Module,
        statistics: nn.Module,
        energy_opt: torch.optim.Optimizer,
        generator_opt: torch.optim.Optimizer,
    ) -> tuple[DDPUpdate, DDPUpdate]:
        """The energy update (E) and the generator update (G and T on one optimizer)."""
        e, g, t, e_opt, g_opt = self.accelerator.prepare(energy, generator, statistics, energy_opt, generator_opt)
        for name, nets, opt in (
            ("energy", {"energy": e}, e_opt),
            ("generator", {"generator": g, "statistics": t}, g_opt),
        ):
            scaler = torch.amp.GradScaler(
                self.device.type, init_scale=FP16_INIT_SCALE, enabled=self.mixed_precision == "fp16"
            )
            # GradScaler gets the torch optimizer itself: accelerate's wrapper hides that the fused
            # Adam can skip an overflowing step on the device, and GradScaler would then sync.
            # DDP's module by hand: accelerate's unwrap_model imports DeepSpeed to look for its engine
            # (half a second of every process's start), and this runtime never has one.
            bare = {k: v.module if isinstance(v, DistributedDataParallel) else v for k, v in nets.items()}
            self.updates[name] = DDPUpdate(nets, bare, getattr(opt, "optimizer", opt), scaler, self.device)
        return self.updates["energy"], self.updates["generator"]

    def for_evaluation(self, module: nn.Module) -> nn.Module:
        """The network as evaluation and sampling should see it (fp32 weights)."""
        return module

    def fp32_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """E's, G's and T's weights in fp32 on the CPU (the checkpoint's engine-free export)."""
        return {
            name: {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
            for update in self.updates.values()
            for name, module in update.modules.items()
        }

    def save_engine_state(self, folder: str) -> None:
        if not self.is_main:
            return
        os.makedirs(folder, exist_ok=True)
        state = {
            name: {"optimizer": u.optimizer.state_dict(), "scaler": u.scaler.state_dict()}
            for name, u in self.updates.items()
        }
        torch.save(state, os.path.join(folder, ENGINE_FILE))

    def restore(self, folder: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The networks from the weights export, the optimizers and loss scalers from ``folder`` (read
        first: a file that cannot be read leaves the networks as they were)."""
        from trainer.checkpoint import load_tensors  # trainer.checkpoint's tools need no runtime

        path = os.path.join(folder, ENGINE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no ddp engine state (was this checkpoint written with train.engine=ddp?)")
        # A CPU device may be "cpu:0" (accelerate's multi-node CPU launch), which torch.load cannot map.
        state = load_tensors(path, map_location=self.device if self.device.type != "cpu" else "cpu")
        for update in self.updates.values():
            for name, module in update.modules.items():
                module.load_state_dict(weights[name])
        for name, update in self.updates.items():
            update.optimizer.load_state_dict(state[name]["optimizer"])
            if update.scaler.is_enabled():
                if state[name]["scaler"]:
                    update.scaler.load_state_dict(state[name]["scaler"])
                elif self.is_main:  # a disabled scaler saves {}: the run switched to fp16 at this resume
                    log.warning("%s: written without fp16, so %s's loss scale starts afresh", folder, name)

    def shutdown(self, meet: bool = True) -> None:
        # Drop accelerate's references to the wrapped models before the group is destroyed.
        self.updates.clear()
        self.accelerator.free_memory()
        super().shutdown(meet)
