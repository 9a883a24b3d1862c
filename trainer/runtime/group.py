"""The process-group services both runtimes share: who this process is, where it computes, seeds,
mixed precision, and the collectives. Plain torch.distributed; one process needs no group."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from data_pipeline.cli import short_message

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The penalty's inner autograd.grad starts from d(scale * sum_i E_i)/dE_i = scale for every sample, in
# E's fp16 output dtype: 2**16 (GradScaler's default) is inf in fp16 (max 65504), so start at 2**15.
FP16_INIT_SCALE = 2.0**15


class LaunchError(RuntimeError):
    """The processes were started in a way this trainer cannot run (the message says how to launch)."""


class CollectiveError(RuntimeError):
    """A collective failed: another rank stopped answering within train.collective_timeout, or ended.
    ``failed_rank``: the rank that said in the store it failed with an error of its own (None: none did)."""

    def __init__(self, message: str, failed_rank: int | None = None):
        super().__init__(message)
        self.failed_rank = failed_rank


# The key under which the first rank to fail with an error of its own leaves its one line in the default
# group's store (the launcher's rendezvous store: it outlives the rank), for the others to name it.
FAILURE_KEY = "meg/failed_rank"
FAILURE_LOOKUP_SECONDS = 5.0  # the others' read of it, once their collective failed


def report_failure(rank: int, world_size: int, error: BaseException) -> None:
    """Leaves ``error``'s one line in the store as this rank's failure (the first rank's to fail stays),
    so that the others, whose collectives fail as this rank leaves, say which rank failed and why."""
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    line = f"{rank}\n{type(error).__name__}: {short_message(error, 300)}"
    with contextlib.suppress(Exception), _default_store() as store:  # a store gone or hung: the others say less
        store.compare_set(FAILURE_KEY, "", line)


def reported_failure() -> tuple[int, str] | None:
    """(rank, its one-line error) of a rank that failed with an error of its own (report_failure), if any."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        with _default_store() as store:
            if not store.check([FAILURE_KEY]):
                return None
            rank, line = store.get(FAILURE_KEY).decode(errors="replace").split("\n", 1)
        return int(rank), line
    except Exception:  # the store ended with the rank that hosted it (no launcher), or hangs
        return None


@contextmanager
def _default_store() -> Iterator[dist.Store]:
    """The default group's store, its waits bounded by FAILURE_LOOKUP_SECONDS meanwhile (a store that
    hangs must not hold up a rank on its way out by train.collective_timeout)."""
    store = dist.distributed_c10d._get_default_store()
    timeout = store.timeout
    store.set_timeout(timedelta(seconds=FAILURE_LOOKUP_SECONDS))
    try:
        yield store
    finally:
        store.set_timeout(timeout)


def collective_failure(error: BaseException, runtime, timeout: float) -> CollectiveError | None:
    """The one-line error for ``error`` when it is a failed collective of a multi-rank job (gloo's
    or NCCL's timeout, a peer's closed connection), else None."""
    text = str(error)
    # gloo names its own timeout on a pair "Application timeout caused pair closure", at times with no
    # "[gloo/...]" prefix and raised as a plain RuntimeError (from inside DDP's backward hooks).
    timeouts = ("Timed out", "timed out", "timeout caused pair closure")
    markers = (*timeouts, "closed by peer", "reset by peer", "Broken pipe", "gloo", "NCCL")
    is_dist_error = isinstance(error, getattr(dist, "DistError", ()))
    if runtime.world_size < 2 or not (is_dist_error or any(m in text for m in markers)):
        return None
    reported = reported_failure()
    if reported is not None and reported[0] != runtime.rank:
        return CollectiveError(
            f"rank {runtime.rank} of {runtime.world_size}: rank {reported[0]} failed ({reported[1]}); this rank "
            "stops too, the newest checkpoint stands",
            failed_rank=reported[0],
        )
    if any(m in text for m in timeouts):
        why = f"another rank did not answer within train.collective_timeout={timeout:g} s (hung, stopped or lost)"
    elif any(m in text for m in ("closed by peer", "reset by peer", "Broken pipe", "Connection closed")):
        why = "another rank ended (its connection closed)"
    else:  # NCCL's own failures (a system or CUDA error, a duplicate GPU) are not another rank's doing
        why = f"{type(error).__name__}: {short_message(error, 200)}"
    return CollectiveError(
        f"rank {runtime.rank} of {runtime.world_size}: a collective failed: {why}; this rank stops too, the newest "
        f"checkpoint stands. (train.collective_timeout={timeout:g} s bounds every wait for the other ranks.)"
    )


class ProcessGroup:
    def __init__(self, device: torch.device, rank: int, world_size: int, mixed_precision: str):
        if mixed_precision not in ("no", *AUTOCAST_DTYPES):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        self.device, self.rank, self.world_size = device, rank, world_size
        self.is_main = rank == 0
        self.mixed_precision = mixed_precision
        self._waiting_group = None  # wait_for_main's

    def seed(self, seed: int, per_rank: bool) -> None:
        """The same seed everywhere (network init), or seed + rank (noise, negatives)."""
        seed = seed + (self.rank if per_rank else 0)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every device's generator too

    @contextmanager
    def fork_rng(self, seed: int | None = None) -> Iterator[None]:
        """A block (seeded with ``seed``, if given) whose random draws leave this process's generators
        as they were: the CPU's and the runtime device's (``fork_rng(devices=[])`` forks the CPU's only)."""
        if self.device.type == "cpu":
            fork = torch.random.fork_rng(devices=[])
        else:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            fork = torch.random.fork_rng(devices=[index], device_type=self.device.type)
        with fork:
            if seed is not None:
                torch.manual_seed(seed)
            yield

    def autocast(self, cache: bool = True):
        """Mixed-precision region for every forward of the three updates (a no-op in fp32). ``cache``
        False: no weight-cast cache (required inside a CUDA graph capture)."""
        dtype = AUTOCAST_DTYPES.get(self.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=cache)

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum_across_ranks(values) / self.world_size if self.world_size > 1 else values

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values``, stacked in rank order: shape (world_size, *values.shape)."""
        if self.world_size == 1:
            return values.unsqueeze(0)
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.stack(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wait_for_main(self, timeout: float, failed: bool = False) -> bool:
        """A barrier after work the main process does alone (an evaluation), bounded by ``timeout``
        seconds instead of train.collective_timeout: on a gloo group of its own (made by every rank at
        the first call: job.train's, as the run starts), on any backend. ``failed``: that work failed on
        this rank; returns whether it failed on any, so that every rank stops together (a main process
        that left with its error met the others in another collective, each side waiting out its timeout)."""
        if self.world_size == 1:
            return failed
        if self._waiting_group is None:
            self._waiting_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        flag = torch.tensor([float(failed)])  # on the CPU: the waiting group is gloo's
        dist.all_reduce(flag, group=self._waiting_group)
        return bool(flag.item())

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
        gathered = self.all_gather(digest)
        return bool((gathered == gathered[0:1]).all())

    def shutdown(self, meet: bool = True) -> None:
        """``meet=False``: the other ranks may be inside a collective this rank will never join (it
        stopped while they waited for it), so it leaves without meeting them; they fail on its exit."""
        # gloo aborts a process at exit ("terminate called without an active exception") when the
        # group is torn down while something still holds it or another rank is still talking:
        # collect what holds it first, then meet, then destroy.
        gc.collect()
        if meet and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def refuse_accelerate_deepspeed() -> None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise LaunchError(
            "accelerate was launched with distributed_type DEEPSPEED; this trainer drives DeepSpeed itself "
            "(one engine per update). Launch with a MULTI_GPU config (deploy/deepspeed/) and set "
            "train.engine=deepspeed."
        )


def check_world_size(joined: int) -> None:
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if joined != expected:
        # accelerate on a machine without a GPU starts unconnected processes unless told to use the CPU.
        raise LaunchError(
            f"WORLD_SIZE={expected} but this process joined a group of {joined}: "
            "the processes did not form one group. On CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (or torchrun)."
        )


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
        # train.engine=fsdp: a network used inside the block may be left gathered (trainer/runtime/fsdp.py),
        # its gathered parameters frozen, and a later forward would reuse them as they are: reshard it, so
        # that its next forward gathers them again with the flags restored here.
        for m in modules:
            for sub in m.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def join_process_group(collective_timeout: float) -> torch.device:
    """torch.distributed's group from the launcher's environment (accelerate launch, torchrun, srun),
    else a group of one; returns this process's device. ``collective_timeout`` bounds every collective."""
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout))
    check_world_size(dist.get_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
