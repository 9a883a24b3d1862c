"""The run folder: one trainer at a time (an advisory lock), and reading a run back for the sample
and evaluate tools: a checkpoint's engine-free weights export and the configuration it was written
with (trainer/checkpoint.py), whatever engine trained it."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time

from models import MEGNetworks, build_networks
from trainer.checkpoint import CheckpointError, damage, list_checkpoints, load_export
from trainer.config import RunConfig, config_from_yaml

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another trainer holds the run folder."""


class RunFolderLock:
    """An advisory lock (flock) on ``<run folder>/.lock``, held by the main process while it trains.
    The file keeps the holder's host, PID and start time for the message a second trainer gets; the
    kernel drops the lock when the holder exits, however it exits. (On network filesystems without
    flock support the lock may not hold across machines.)"""

    def __init__(self, folder: str):
        self.folder, self.path, self.fd = folder, os.path.join(folder, LOCK_FILE), None

    def try_acquire(self) -> str | None:
        """None once locked; else a message naming the holder."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return (
                f"{self.folder} is in use by another trainer ({holder}); wait for it to finish, stop it, "
                "or train into another output_dir"
            )
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """``checkpoint`` if given (it must be intact), else the run's newest intact checkpoint (a damaged
    newer one is named on stderr)."""
    if checkpoint is not None:
        problem = damage(checkpoint) if os.path.isdir(checkpoint) else "no such folder"
        if problem:
            raise CheckpointError(f"checkpoint {checkpoint} cannot be read: {problem}")
        return checkpoint
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no such folder)")
    found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet (checkpoints/step_XXXXXXXX)")
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        print(f"warning: checkpoint {path} is damaged ({problem}); using the one before it", file=sys.stderr)
    raise CheckpointError(f"every checkpoint of {run_dir} is damaged; the newest: {damage(found[-1])}")


def load_networks(run_dir: str, checkpoint: str | None = None) -> tuple[RunConfig, MEGNetworks, str, dict]:
    """The checkpoint's config, its networks (eager kernels, eval mode, CPU), the checkpoint folder
    used, and the export's metadata (sample_shape, dataset, step, version)."""
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    weights, info, config_yaml = load_export(checkpoint)
    cfg = config_from_yaml(config_yaml, os.path.join(checkpoint, "config.yaml"))
    nets = build_networks(cfg.model, tuple(info["sample_shape"]))
    for name in ("energy", "generator", "statistics"):
        module = getattr(nets, name)
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as e:  # a config.yaml that does not describe these weights
            raise CheckpointError(f"{checkpoint}: its weights do not fit its config.yaml ({name}): {e}") from None
        module.eval()
    return cfg, nets, checkpoint, info
