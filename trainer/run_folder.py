"""The run folder: one trainer at a time (an advisory lock), and reading a run back for the sample
and evaluate tools: a checkpoint's engine-free weights export and the configuration it was written
with (trainer/checkpoint.py), whatever engine trained it."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator

import torch

from data_pipeline.cli import short_message
from models.factory import MEGNetworks, build_networks
from trainer.checkpoint import (
    EMA_NETWORK,
    FLED_SUFFIX,
    MISSING_FILE_LIST,
    CheckpointError,
    damage,
    is_checkpoint_folder,
    list_checkpoints,
    load_export,
    run_folder_of,
)
from trainer.config import RunConfig, config_from_yaml, vera_settings
from trainer.nofollow import open_fd

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class RunFolderBusy(RuntimeError):
    """Another trainer holds the run folder."""


class RunFolderLock:
    """An advisory lock (flock) on ``<run folder>/.lock``, held by the main process while it trains.
    The file keeps the holder's host, PID and start time for the message a second trainer gets; the
    kernel drops the lock when the holder exits, however it exits. The descriptor is closed in every
    forked child (DataLoader workers) and is not passed to programs the trainer starts, so only the
    trainer holds the lock. A lock whose recorded holder is a dead process of this host, PID namespace
    and boot (held by an orphan of an older version, say) is taken over with a warning. (On network filesystems without
    flock support the lock may not hold across machines.)"""

    def __init__(self, folder: str):
        self.folder, self.path, self.fd = folder, os.path.join(folder, LOCK_FILE), None

    def try_acquire(self) -> str | None:
        """None once locked; else a message naming the holder."""
        os.makedirs(self.folder, exist_ok=True)
        with _folder_locked(self.folder):  # contenders take turns, so that one takes a stale lock over
            fd = open_fd(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if not _dead_holder(holder):
                    return (
                        f"{self.folder} is in use by another trainer ({holder}); wait for it to finish, stop it, "
                        "or train into another output_dir"
                    )
                log.warning(
                    "%s: the lock's holder (%s) is no longer running (a leftover process keeps the old lock): "
                    "taking the run folder over",
                    self.path,
                    holder,
                )
                os.unlink(self.path)  # the leftover keeps its lock on the old file; this is a new one
                fd = open_fd(self.path, os.O_RDWR | os.O_EXCL)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            namespace = _pid_namespace()
            recorded = f", pid namespace {namespace}" if namespace else ""
            os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}{recorded}\n".encode())
        self.fd = fd
        _HELD.add(fd)
        return None

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing drops the lock
            self.fd = None


_HELD: set[int] = set()  # the lock descriptors this process holds


def _close_held_locks() -> None:
    """In a forked child: its copies of the lock descriptors go, so the lock ends with the trainer
    (closing a copy leaves the trainer's lock alone; unlocking would not)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


@contextlib.contextmanager
def _folder_locked(folder: str, timeout: float = 10.0) -> Iterator[None]:
    """A short lock on the folder itself while the run folder's lock is examined and taken."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    message = f"{folder}: another trainer is taking its lock (waited {timeout:g} s)"
                    raise RunFolderBusy(message) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _pid_namespace() -> str:
    """This process's PID namespace and boot ("" where /proc does not tell): a recorded PID names a
    process only within both. A container that shares the host's name (host networking) on a shared
    volume has PIDs of its own."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{os.stat('/proc/self/ns/pid').st_ino}@{f.read().strip()}"
    except OSError:
        return ""


def _dead_holder(holder: str) -> bool:
    """Whether a lock file's text names a process of this host, PID namespace and boot that no longer
    runs (a text without the namespace, an older version's, is judged by the host alone)."""
    m = re.match(r"host (\S+), pid (\d+)", holder)
    if not m or m.group(1) != socket.gethostname() or int(m.group(2)) == os.getpid():
        return False
    recorded = re.search(r"pid namespace (\S+)", holder)
    if recorded and recorded.group(1) != _pid_namespace():
        return False  # its PID means another process here, or none: it may well be running
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """``checkpoint`` if given (one of the run's, intact; a bare name counts: step_00001000), else
    the run's newest intact checkpoint (a damaged newer one is named on stderr). Either way, one without
    files.json that otherwise loads is used with a warning that it is unverified. One folder given for
    the other (a checkpoint as the run, the run as a checkpoint) is refused saying which is which."""
    if is_checkpoint_folder(run_dir):
        raise CheckpointError(
            f"{run_dir} is a checkpoint, not a run folder: use --run {run_folder_of(run_dir)} --checkpoint {run_dir}"
        )
    if checkpoint is not None:
        if not checkpoint.strip():  # it was the run's checkpoints/ folder: "files.json is missing"
            raise CheckpointError(
                "--checkpoint is empty: name one (step_XXXXXXXX or its path), or leave it out for the newest"
            )
        # A trailing slash (a shell's completion adds one) named no step: the figure was titled ", MALA steps 0"
        # and a bare step_XXXXXXXX/ was "no such folder".
        checkpoint = checkpoint.rstrip(os.sep) or checkpoint
        in_run = os.path.join(run_dir, "checkpoints", checkpoint)
        if os.sep not in checkpoint and not os.path.isdir(checkpoint) and os.path.isdir(in_run):
            checkpoint = in_run
        elif os.path.isdir(os.path.join(checkpoint, "checkpoints")) and not is_checkpoint_folder(checkpoint):
            example = os.path.join(checkpoint, "checkpoints", "step_XXXXXXXX")
            raise CheckpointError(
                f"--checkpoint {checkpoint} is a run folder: give it as --run (its newest checkpoint is used), "
                f"or name one of its checkpoints, e.g. --checkpoint {example}"
            )
        problem = damage(checkpoint) if os.path.isdir(checkpoint) else _not_a_folder(checkpoint)
        if problem not in (None, MISSING_FILE_LIST):
            raise CheckpointError(f"checkpoint {checkpoint} cannot be read: {problem}")
        # Another run's checkpoint: its samples and results would land in this run's folder, under its name.
        inside = os.path.realpath(os.path.join(run_dir, "checkpoints"))
        if os.path.dirname(os.path.realpath(checkpoint)) != inside:
            raise CheckpointError(
                f"checkpoint {checkpoint} is not one of {run_dir}'s (in {os.path.join(run_dir, 'checkpoints')}): "
                f"use --run {run_folder_of(checkpoint)}, where its results belong"
            )
        name = os.path.basename(checkpoint)
        if name.endswith(".partial"):  # a save that never finished: its ranks' files may be half there
            raise CheckpointError(
                f"checkpoint {checkpoint} is a save that did not finish (.partial), never a checkpoint: "
                f"name one of {os.path.join(run_dir, 'checkpoints')}'s step_XXXXXXXX folders"
            )
        if name.rstrip("0123456789").endswith(FLED_SUFFIX):  # .fled, or .fled2, ... (Checkpoints.set_aside_fled)
            print(
                f"warning: checkpoint {checkpoint} is one the divergence guard fled (its next steps diverged "
                "at every learning rate tried): no resume takes it; read here as asked",
                file=sys.stderr,
            )
        if problem == MISSING_FILE_LIST:
            _warn_unverified(checkpoint)
        return checkpoint
    if not os.path.isdir(run_dir):
        raise CheckpointError(
            f"{run_dir} is not a run folder ({_not_a_folder(run_dir)}): --run takes a training run's output_dir"
        )
    found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
            raise CheckpointError(
                f"{run_dir} is not a run folder (it has no config.yaml or checkpoints/): --run takes a training "
                "run's output_dir"
            )
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet (checkpoints/step_XXXXXXXX)")
    for i in range(len(found) - 1, -1, -1):
        path, problem = found[i], damage(found[i])
        if problem is None:
            return path
        if problem == MISSING_FILE_LIST:
            _warn_unverified(path)
            return path
        if i > 0:
            print(f"warning: checkpoint {path} is damaged ({problem}); using the one before it", file=sys.stderr)
    raise CheckpointError(f"every checkpoint of {run_dir} is damaged; the newest: {damage(found[-1])}")


def _not_a_folder(path: str) -> str:
    return "a file, not a folder" if os.path.exists(path) else "no such folder"


def _warn_unverified(checkpoint: str) -> None:
    """A checkpoint without files.json that otherwise loads is used, as a resume uses it
    (trainer/checkpoint.py), with this warning: given or found, the same checkpoint is read alike."""
    print(f"warning: checkpoint {checkpoint} has no files.json: using it unverified", file=sys.stderr)


def load_networks(run_dir: str, checkpoint: str | None = None) -> tuple[RunConfig, MEGNetworks, str, dict]:
    """The checkpoint's config, its networks (eager kernels, eval mode, CPU), the checkpoint folder
    used, and the export's metadata (sample_shape, dataset, step, version). The generator holds the
    generator's EMA when the run kept one (train.generator_ema), as the trainer's evaluation used."""
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    weights, info, config_yaml = load_export(checkpoint)
    if EMA_NETWORK in weights:
        weights["generator"] = weights[EMA_NETWORK]
    cfg = config_from_yaml(config_yaml, os.path.join(checkpoint, "config.yaml"))
    # A config.yaml that does not describe these weights (edited, in a checkpoint without files.json):
    # one line, where it was models.factory's traceback (another arch) or load_state_dict's dozen lines.
    fix = "restore the checkpoint's config.yaml, or give another --checkpoint"
    try:
        nets = build_networks(cfg.model, tuple(info["sample_shape"]), vera=vera_settings(cfg))
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: its config.yaml does not describe its weights: {e}; {fix}") from None
    for name in ("energy", "generator", "statistics"):
        module = getattr(nets, name)
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as e:
            raise CheckpointError(
                f"{checkpoint}: its config.yaml does not describe its weights ({name}): "
                f"{short_message(' '.join(str(e).split()), 240)}; {fix}"
            ) from None
        module.eval()
    return cfg, nets, checkpoint, info


def ready_to_draw(nets: MEGNetworks, seed: int) -> None:
    """E and G on the device the trainer's evaluation used (CUDA when present), and the draws seeded:
    the sample and evaluate tools share this, so one checkpoint and seed give both tools the same
    latents and chains."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for net in (nets.energy, nets.generator):
        net.to(device)
    torch.manual_seed(seed)
