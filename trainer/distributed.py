"""Every distributed concern of the trainer: process group, devices, seeds, wrapping, reductions,
checkpoints. The rest of the trainer never names a backend or a rank.

Checkpoints are written by every rank into ``checkpoints/step_XXXXXXXX.partial`` and renamed to
their final name by the main process only after all ranks finished, so a crash during a save never
leaves a checkpoint that loads half; a ``.partial`` folder is ignored and cleaned up later.
"""

from __future__ import annotations

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


class Runtime:
    """Wraps an ``Accelerator``: one per process."""

    def __init__(self, mixed_precision: str = "no"):
        self.accelerator = Accelerator(mixed_precision=mixed_precision)
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

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="mean") if self.world_size > 1 else values

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.world_size > 1 else values

    def ranks_in_sync(self, *modules: nn.Module) -> bool:
        """True when every rank holds bit-identical parameters and buffers (one small all-gather)."""
        if self.world_size == 1:
            return True
        digest = torch.stack([
            torch.stack([t.detach().double().sum(), t.detach().double().abs().sum(),
                         (t.detach().double().flatten() * torch.arange(t.numel(), device=t.device)).sum()])
            for m in modules for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()
        ])
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
        self.accelerator.save_state(partial)
        self.barrier()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path)

    def shutdown(self) -> None:
        # A barrier before destroying the group avoids gloo's "terminate called without an active
        # exception" abort at exit (stack-notes).
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


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
