"""Faults lose nothing: run folders whose files are links are refused and nothing is written through a
link, the lock stays with the trainer, checkpoints without files.json are used and kept, pruning
keeps real checkpoints, a damaged checkpoint found after a load falls back, the guard escapes a bad
checkpoint, and a full disk during a save is one line that loses nothing.

Classes of issue 19 and the tests that cover them:
    1 links followed:      test_a_linked_*, test_writers_*, test_appending_to_a_hard_linked_*,
                           test_the_trainer_refuses_a_linked_run_folder_*, test_a_partial_save_that_is_a_link_*
    3 checkpoints lost:    test_the_lock_*, test_a_lock_*, test_process_workers_end_*, test_*unverified*,
                           test_pruning_*, test_a_save_to_an_existing_step_*, test_the_state_file_*,
                           test_a_config_that_does_not_parse_*, test_a_save_is_on_disk_before_*
    inexact resumes:       test_*_data_settings_*, test_a_ddp_resume_on_another_number_of_ranks_*
    4 guard stuck:         test_parameters_checked_after_a_load_*, test_the_guard_*,
                           test_a_checkpoint_whose_weights_explode_is_escaped
    7 unnamed save errors: test_a_full_disk_*, test_a_refused_weights_only_*, test_a_malformed_safetensors_*
"""

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.config import StreamPosition
from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from trainer.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    Checkpoints,
    TrainState,
    damage,
    rng_state,
    set_rng_state,
    write_file_list,
)
from trainer.config import GuardConfig, config_to_yaml, load_config
from trainer.guard import Diverged, DivergenceGuard
from trainer.main import descendants
from trainer.metrics import JsonlSink
from trainer.nofollow import LinkedRunFolder, check_run_folder, open_append, write_replacing
from trainer.run_folder import RunFolderLock

VICTIM_TEXT = "someone else's file\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    yield path
    assert path.read_text() == VICTIM_TEXT, "a file outside the run folder was modified"


# -- class 1: nothing written through a link ---------------------------------------------------------


@pytest.mark.parametrize("name", [".lock", "config.yaml", "metrics.jsonl", "checkpoints", "eval"])
def test_a_linked_managed_entry_is_refused_naming_it(tmp_path, victim, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    with pytest.raises(LinkedRunFolder, match=f"{name} -> {victim}"):
        check_run_folder(str(run))


def test_a_linked_file_inside_a_checkpoint_is_refused(tmp_path, victim):
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "files.json").symlink_to(victim)
    with pytest.raises(LinkedRunFolder, match="checkpoints/step_00000010/files.json"):
        check_run_folder(str(tmp_path / "run"))


def test_writers_never_follow_a_link(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".lock", "metrics.jsonl", "config.yaml"):
        (run / name).symlink_to(victim)
    with pytest.raises(LinkedRunFolder, match=".lock is a link"):
        RunFolderLock(str(run)).try_acquire()
    with pytest.raises(LinkedRunFolder, match="metrics.jsonl is a link"):
        JsonlSink(str(run / "metrics.jsonl"))
    with write_replacing(str(run / "config.yaml")) as f:  # replaces the link itself
        f.write("name: mine\n")
    assert not (run / "config.yaml").is_symlink() and (run / "config.yaml").read_text() == "name: mine\n"


def test_appending_to_a_hard_linked_file_leaves_the_other_name_alone(tmp_path, victim):
    metrics = tmp_path / "metrics.jsonl"
    os.link(victim, metrics)
    with open_append(str(metrics)) as f:
        f.write("{}\n")
    assert metrics.read_text() == VICTIM_TEXT + "{}\n"


@pytest.mark.slow
def test_the_trainer_refuses_a_linked_run_folder_before_any_work(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".lock", "config.yaml", "metrics.jsonl"):
        (run / name).symlink_to(victim)
    result = run_trainer(tiny_overrides(tmp_path), check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in (".lock", "config.yaml", "metrics.jsonl"))
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # refused before the toy data was written


# -- class 3: the lock stays with the trainer --------------------------------------------------------


def _holders(path) -> list[int]:
    """PIDs of processes with an open descriptor on ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_lock_is_not_inherited_by_a_forked_child(tmp_path):
    lock = RunFolderLock(str(tmp_path))
    assert lock.try_acquire() is None
    child = os.fork()
    if child == 0:  # a DataLoader worker would be forked like this
        time.sleep(3)
        os._exit(0)
    try:
        time.sleep(0.3)
        assert child not in _holders(tmp_path / ".lock")
        lock.release()
        second = RunFolderLock(str(tmp_path))
        assert second.try_acquire() is None  # the child, still alive, holds nothing
        second.release()
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


@pytest.mark.parametrize("namespace", ["", "this"], ids=["older-version", "same-namespace"])
def test_a_lock_recorded_for_a_dead_process_is_taken_over(tmp_path, caplog, namespace):
    from trainer.run_folder import _pid_namespace

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    recorded = f", pid namespace {_pid_namespace()}" if namespace else ""
    holder_text = f"host {socket.gethostname()}, pid {dead.pid}, since then{recorded}\n"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        f"fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, {holder_text.encode()!r}); print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )  # an orphan that keeps the dead trainer's lock
    orphan = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "ready"
        lock = RunFolderLock(str(tmp_path))
        with caplog.at_level(logging.WARNING):
            assert lock.try_acquire() is None
        assert f"pid {dead.pid}" in caplog.text and "taking the run folder over" in caplog.text
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
        # A third trainer meets a live holder: refused.
        assert "in use by another trainer" in RunFolderLock(str(tmp_path)).try_acquire()
        lock.release()
    finally:
        orphan.kill()
        orphan.wait()


def test_a_lock_recorded_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """A trainer in a container with the host's name: its PID, dead here, may well run there."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder_text = f"host {socket.gethostname()}, pid {dead.pid}, since then, pid namespace 4026531836@another-boot\n"
    code = (
        "import fcntl, os, time\n"
        f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        f"fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, {holder_text.encode()!r}); print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        message = RunFolderLock(str(tmp_path)).try_acquire()
        assert message is not None and f"pid {dead.pid}" in message and "in use by another trainer" in message
        assert (tmp_path / ".lock").read_text() == holder_text
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_held_by_a_live_process_is_not_taken_over(tmp_path):
    code = (
        "import fcntl, os, socket, time\n"
        f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'host {socket.gethostname()}, pid {os.getpid()}, since now'.encode())\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        message = RunFolderLock(str(tmp_path)).try_acquire()
        assert message is not None and f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


# -- class 3 and 7: checkpoints ----------------------------------------------------------------------


class FakeRuntime:
    """One CPU process: what Checkpoints needs of a runtime, with three tiny networks."""

    device, rank, world_size, is_main = torch.device("cpu"), 0, 1, True

    def __init__(self):
        torch.manual_seed(0)
        self.nets = {name: nn.Linear(3, 2) for name in ("energy", "generator", "statistics")}

    def all_gather(self, t):
        return t.unsqueeze(0)

    def sum_across_ranks(self, t):
        return t

    def barrier(self):
        pass

    def fp32_state_dicts(self):
        return {n: {k: v.detach().clone().float() for k, v in m.state_dict().items()} for n, m in self.nets.items()}

    def save_engine_state(self, folder):
        os.makedirs(folder)
        torch.save({"moments": torch.ones(2)}, os.path.join(folder, "ddp_state.pt"))

    def restore(self, folder, weights):
        from trainer.checkpoint import load_tensors

        load_tensors(os.path.join(folder, "ddp_state.pt"))
        for name, module in self.nets.items():
            module.load_state_dict(weights[name])


@pytest.fixture(scope="module")
def config_yaml():
    return config_to_yaml(load_config("toy_25gaussians"))


def _checkpoints(tmp_path, config_yaml, keep=3, keep_first=False):
    return Checkpoints(str(tmp_path / "checkpoints"), keep, config_yaml, {"sample_shape": [2]}, keep_first=keep_first)


def _save(checkpoints, runtime, step):
    with torch.no_grad():
        for module in runtime.nets.values():
            module.weight.add_(0.1)
    return checkpoints.save(runtime, TrainState(step=step))


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_load_restores_the_random_generators_and_the_trainer_state_as_saved(tmp_path, config_yaml):
    # An exact resume draws the same numbers the straight run drew after the save (z, permutations,
    # MALA's noise, shuffles), and keeps the rollback-lowered learning rate, the schedule's length and
    # DV's moving average.
    runtime = FakeRuntime()
    saved = TrainState(step=10, lr_scale=0.25, lr_horizon=500)
    saved.entropy_state = {"log_ma": torch.tensor(1.5), "count": torch.tensor(7.0)}
    written = _checkpoints(tmp_path, config_yaml).save(runtime, saved)
    after_save = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)  # the process that resumes starts from other generators
    np.random.seed(99)
    torch.manual_seed(99)
    state = TrainState()
    state.entropy_state = {"log_ma": torch.zeros(()), "count": torch.zeros(())}
    _checkpoints(tmp_path, config_yaml).load(written, runtime, state)
    assert (random.random(), np.random.rand()) == after_save[:2]
    assert torch.equal(torch.rand(3), after_save[2])
    assert state.step == 10 and state.lr_scale == 0.25 and state.lr_horizon == 500
    assert {k: float(v) for k, v in state.entropy_state.items()} == {"log_ma": 1.5, "count": 7.0}


def test_a_checkpoint_without_files_json_is_used_unverified_and_never_overwritten(tmp_path, config_yaml, caplog):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1)
    old = _save(checkpoints, runtime, 10)
    os.remove(os.path.join(old, "files.json"))  # an older version's checkpoint, or a copy without it
    before = _snapshot(tmp_path / "checkpoints" / "step_00000010")
    fresh = _checkpoints(tmp_path, config_yaml, keep=1)  # a new process
    with caplog.at_level(logging.WARNING):
        assert fresh.newest_intact(runtime) == old
    assert "cannot be verified: using it unverified" in caplog.text
    state = TrainState()
    assert fresh.load_newest(runtime, state, old) == old and state.step == 10
    _save(fresh, runtime, 20)  # keep=1: the unverified one is not counted, not pruned
    _save(fresh, runtime, 10)  # a save to its step keeps it aside
    assert _snapshot(tmp_path / "checkpoints" / "step_00000010.replaced") == before
    assert damage(str(tmp_path / "checkpoints" / "step_00000010")) is None


def test_pruning_counts_only_intact_checkpoints(tmp_path, config_yaml):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1)
    _save(checkpoints, runtime, 10)
    folder = tmp_path / "checkpoints"
    (folder / "step_00000090").mkdir()  # a stray folder
    (folder / "step_00000099").mkdir()
    (folder / "step_00000099" / "files.json").write_text("{")  # a damaged one
    written = _save(checkpoints, runtime, 20)
    assert damage(written) is None  # the one just written survives its own pruning
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000020", "step_00000090", "step_00000099"]


def test_a_prune_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, config_yaml, monkeypatch):
    """A process killed while pruning left the checkpoint it was deleting half there, under its own
    name: damaged, so never pruned again (one more left behind at each such kill), and listed among
    the checkpoints a restart tries."""
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1)
    _save(checkpoints, runtime, 10)

    def killed_midway(path, ignore_errors=False):
        os.remove(os.path.join(path, "files.json"))
        os.remove(os.path.join(path, "engine", "ddp_state.pt"))
        raise KeyboardInterrupt  # as a SIGKILL would stop it, the rest left on disk

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            _save(checkpoints, runtime, 20)
    folder = tmp_path / "checkpoints"
    fresh = _checkpoints(tmp_path, config_yaml, keep=1)  # the restarted process
    assert [damage(p) for p in fresh.list()] == [None], sorted(p.name for p in folder.iterdir())
    _save(fresh, runtime, 30)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000030"]


def test_a_killed_prunes_leftover_is_freed_before_the_next_save_writes(tmp_path, config_yaml, monkeypatch):
    """A prune killed midway leaves step_N.pruning, as much as a checkpoint on disk: freed by the next
    prune only, after the next save had written hers beside it (on a full disk: the save that fails)."""
    runtime = FakeRuntime()
    folder = tmp_path / "checkpoints"
    _save(_checkpoints(tmp_path, config_yaml, keep=1), runtime, 10)
    shutil.copytree(folder / "step_00000010", folder / "step_00000005.pruning")  # the killed prune's
    leftovers_at_write = []
    mkdir = os.mkdir

    def recorded_mkdir(path, *args, **kwargs):
        if str(path).endswith(".partial"):
            leftovers_at_write.append(sorted(p.name for p in folder.iterdir() if p.name.endswith(".pruning")))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", recorded_mkdir)
    _save(_checkpoints(tmp_path, config_yaml, keep=1), runtime, 20)
    assert leftovers_at_write == [[]]
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000020"]


def test_pruning_keeps_step_0_for_the_guard(tmp_path, config_yaml):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1, keep_first=True)
    for step in (0, 10, 20, 30):
        _save(checkpoints, runtime, step)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000000", "step_00000030"]


def test_a_save_to_an_existing_step_keeps_the_old_one_aside(tmp_path, config_yaml):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml)
    _save(checkpoints, runtime, 10)
    before = _snapshot(tmp_path / "checkpoints" / "step_00000010")
    _save(checkpoints, runtime, 10)  # e.g. a rollback that passes step 10 again
    _save(checkpoints, runtime, 10)
    folder = tmp_path / "checkpoints"
    assert _snapshot(folder / "step_00000010.replaced") == before
    assert (folder / "step_00000010.replaced2").is_dir() and damage(str(folder / "step_00000010")) is None


def _on_two_ranks(target, *args) -> dict:
    """Runs ``target(rank, port, results, *args)`` in two spawned processes that form a gloo group on
    ``port``; returns what each rank put in ``results``, by rank."""
    import multiprocessing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    ranks = [spawn.Process(target=target, args=(r, port, results, *args)) for r in range(2)]
    for p in ranks:
        p.start()
    said = dict(results.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(60)
    return said


def _save_on_two_ranks(rank: int, port: int, results, folder: str) -> None:
    """One of two gloo ranks saving step 10, then step 20 with rank 1's share failing (a full disk
    on its node): what each rank's save raised goes to ``results``."""
    import datetime

    import torch.distributed as dist

    from trainer.runtime.group import ProcessGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))

    class TwoRanks(ProcessGroup, FakeRuntime):
        fail = False

        def save_engine_state(self, engine_folder):  # each rank its own share, as FSDP and ZeRO write
            os.makedirs(engine_folder, exist_ok=True)
            path = os.path.join(engine_folder, f"shard_rank{self.rank}.pt")
            if self.fail and self.rank == 1:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            torch.save({"moments": torch.ones(2)}, path)

    runtime = TwoRanks(torch.device("cpu"), rank, 2, "no")
    FakeRuntime.__init__(runtime)
    config_yaml = config_to_yaml(load_config("toy_25gaussians"))
    checkpoints = Checkpoints(os.path.join(folder, "checkpoints"), 1, config_yaml, {})
    checkpoints.save(runtime, TrainState(step=10))
    runtime.fail = True
    try:
        checkpoints.save(runtime, TrainState(step=20))
        results.put((rank, "saved"))
    except CheckpointError as e:
        results.put((rank, str(e)))
    runtime.shutdown(meet=True)  # as trainer/job.py's run() does on the way out


@pytest.mark.slow
def test_a_rank_whose_share_of_a_save_fails_leaves_no_checkpoint_and_the_older_one_kept(tmp_path):
    """The ranks agree that each wrote its files before the checkpoint is published: else the failed
    rank's way out (a barrier) let rank 0 publish it without them and prune the older one (keep=1)."""
    said = _on_two_ranks(_save_on_two_ranks, str(tmp_path))
    final = tmp_path / "checkpoints" / "step_00000020"
    assert said[1].startswith(f"could not write checkpoint {final}: No space left on device"), said
    assert said[0].startswith(f"could not write checkpoint {final}: another rank could not write its part"), said
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010"]
    older = tmp_path / "checkpoints" / "step_00000010"
    assert damage(str(older)) is None
    assert sorted(p.name for p in (older / "engine").iterdir()) == ["shard_rank0.pt", "shard_rank1.pt"]


def _restore_on_two_ranks(rank: int, port: int, results, folder: str) -> None:
    """One of two gloo ranks saving steps 10 and 20, then resuming the newest, which rank 1 alone
    cannot restore (its node's copy of the engine file unreadable): which step each rank loaded, and
    whether the two still meet after it, go to ``results``."""
    import datetime

    import torch.distributed as dist

    from trainer.runtime.group import ProcessGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))

    class TwoRanks(ProcessGroup, FakeRuntime):
        def save_engine_state(self, engine_folder):  # one file, as DDP's main process writes
            os.makedirs(engine_folder, exist_ok=True)
            if self.is_main:
                torch.save({"moments": torch.ones(2)}, os.path.join(engine_folder, "ddp_state.pt"))

        def restore(self, engine_folder, weights):
            if self.rank == 1 and "step_00000020" in engine_folder:
                raise CheckpointError(f"{engine_folder}/ddp_state.pt is not a readable torch file: truncated")
            super().restore(engine_folder, weights)

    runtime = TwoRanks(torch.device("cpu"), rank, 2, "no")
    FakeRuntime.__init__(runtime)
    config_yaml = config_to_yaml(load_config("toy_25gaussians"))
    checkpoints = Checkpoints(os.path.join(folder, "checkpoints"), 3, config_yaml, {})
    for step in (10, 20):
        _save(checkpoints, runtime, step)
    state = TrainState(rank, 2)
    try:
        loaded = checkpoints.load_newest(runtime, state, checkpoints.newest_intact(runtime))
        met = runtime.sum_across_ranks(torch.ones(1)).item()
        results.put((rank, f"{os.path.basename(loaded)} at step {state.step}, met {met:g}"))
    except RuntimeError as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    runtime.shutdown(meet=True)


@pytest.mark.slow
def test_a_checkpoint_one_rank_cannot_restore_sends_every_rank_to_the_one_before_it(tmp_path):
    """Without agreeing, rank 1 went back to step 10 while rank 0 trained on from step 20: two
    trajectories, each rank waiting for the other in its next collective."""
    said = _on_two_ranks(_restore_on_two_ranks, str(tmp_path))
    assert said == {0: "step_00000010 at step 10, met 2", 1: "step_00000010 at step 10, met 2"}, said


def _evaluate_on_two_ranks(rank: int, port: int, results) -> None:
    """Rank 0 works alone for 3 s (an evaluation) twice under a 1 s collective timeout; rank 1 waits."""
    import datetime

    import torch.distributed as dist

    from trainer.runtime.group import ProcessGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=1))
    runtime = ProcessGroup(torch.device("cpu"), rank, 2, "no")
    try:
        for _ in range(2):  # the first wait also makes the waiting group
            if rank == 0:
                time.sleep(3)
            runtime.wait_for_main(timeout=60)
        total = runtime.sum_across_ranks(torch.ones(1)).item()  # the default group still works after it
        results.put((rank, f"met, {total:g}"))
    except RuntimeError as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    runtime.shutdown(meet=True)


@pytest.mark.slow
def test_the_ranks_wait_for_the_main_evaluation_past_the_collective_timeout():
    """Rank 0 evaluates alone; the others' wait is bounded by train.evaluation_timeout, not by the
    collective timeout meant for steps, which ended the job at every long evaluation (FID, MALA)."""
    said = _on_two_ranks(_evaluate_on_two_ranks)
    assert said == {0: "met, 2", 1: "met, 2"}, said


def _failing_evaluation_on_two_ranks(rank: int, port: int, results, where: str = "evaluator") -> None:
    """Rank 0's evaluation at step 10 raises (``where``: in the evaluator, or in logging its results);
    rank 1 waits for it (collective timeout 30 s, evaluation timeout 60 s): what each rank's
    TrainingEvaluation raised goes to ``results``."""
    import datetime
    import types

    import torch.distributed as dist

    from trainer.meg_trainer import TrainingEvaluation
    from trainer.metrics import MetricSink, MetricsLogger
    from trainer.runtime.group import ProcessGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))

    class TwoRanks(ProcessGroup):
        def for_evaluation(self, module):
            return module

    def evaluator(step, energy, generator):
        if where == "evaluator":
            raise ValueError("the evaluation's own error")
        return {"high_quality_share": 0.5}

    class FullDisk(MetricSink):  # the curves' figure, a tracker: the results' sinks
        def log(self, step, metrics):
            raise OSError(errno.ENOSPC, "No space left on device")

    runtime = TwoRanks(torch.device("cpu"), rank, 2, "no")
    cfg = load_config("toy_25gaussians", ["train.collective_timeout=30", "train.evaluation_timeout=60"])
    steps = types.SimpleNamespace(energy=nn.Linear(2, 1), evaluation_generator=lambda: nn.Linear(2, 2))
    logger = MetricsLogger([FullDisk()] if where == "logger" and rank == 0 else [])
    evaluation = TrainingEvaluation(cfg, runtime, steps, None, evaluator, logger, lambda: None)
    try:
        evaluation(10)
        results.put((rank, "evaluated"))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    runtime.shutdown(meet=True)  # as trainer/job.py's run() does on the way out


@pytest.mark.slow
def test_an_evaluation_that_fails_on_the_main_process_stops_every_rank_at_once():
    """The main process's failed evaluation used to leave it meeting the others on its way out while they
    waited for its evaluation in another collective: each side waited out its own timeout (the others
    train.evaluation_timeout, 4 h by default). Now every rank learns of it where they wait."""
    said = _on_two_ranks(_failing_evaluation_on_two_ranks)
    assert said[0] == "ValueError: the evaluation's own error", said
    assert said[1].startswith("CollectiveError: rank 1 of 2: the main process's evaluation at step 10 failed"), said


@pytest.mark.slow
def test_an_evaluation_whose_results_fail_to_log_on_the_main_process_stops_every_rank_at_once():
    """Logging the results (metrics.jsonl, the curves' figure, a tracker) is the main process's work
    alone too: one that failed (a full disk) left the others waiting for it, as its evaluator's error did."""
    start = time.monotonic()
    said = _on_two_ranks(_failing_evaluation_on_two_ranks, "logger")
    assert said[0].startswith("OSError: [Errno 28] No space left on device"), said
    assert said[1].startswith("CollectiveError: rank 1 of 2: the main process's evaluation at step 10 failed"), said
    assert time.monotonic() - start < 25  # not the main process's meeting of 30 s on its way out


def _main_killed_in_the_first_evaluation(rank: int, port: int, results) -> None:
    """Rank 0 ends (killed, out of memory) during the run's first evaluation while rank 1 waits for it;
    the store is the launcher's (torchrun's agent), which outlives rank 0: what rank 1 raised goes to
    ``results``."""
    import datetime
    import types

    import torch.distributed as dist

    from trainer.meg_trainer import TrainingEvaluation
    from trainer.metrics import MetricsLogger
    from trainer.runtime.group import ProcessGroup

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))

    class TwoRanks(ProcessGroup):
        def for_evaluation(self, module):
            return module

    def evaluator(step, energy, generator):
        os._exit(9)

    runtime = TwoRanks(torch.device("cpu"), rank, 2, "no")
    cfg = load_config("toy_25gaussians", ["train.collective_timeout=30", "train.evaluation_timeout=60"])
    steps = types.SimpleNamespace(energy=nn.Linear(2, 1), evaluation_generator=lambda: nn.Linear(2, 2))
    evaluation = TrainingEvaluation(cfg, runtime, steps, None, evaluator, MetricsLogger([]), lambda: None)
    try:
        evaluation(10)
        results.put((rank, "evaluated"))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.slow
def test_a_main_process_killed_during_the_first_evaluation_ends_the_others_wait():
    """The waiting group was made at the first evaluation: a main process that ended during it left the
    others waiting in the store for it to join, which no closed connection ends (the launcher's store
    lives on), up to train.evaluation_timeout, 4 h by default, with SIGTERM not honoured meanwhile (the
    evaluation's heartbeat). Made as the trainer starts, the wait is on a connection rank 0's end closes."""
    import multiprocessing

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)  # noqa: F841
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    ranks = [spawn.Process(target=_main_killed_in_the_first_evaluation, args=(r, port, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        rank, said = results.get(timeout=120)
    finally:
        for p in ranks:
            p.kill()
            p.join(10)
    assert rank == 1 and "by peer" in said and "imed out" not in said, said  # closed, or reset, by rank 0


def test_the_evaluations_waiting_group_is_made_before_any_work_of_the_main_process_alone(tmp_path):
    """Made by TrainingEvaluation, after the main process's own work (the toy data, the run folder, the
    metrics sinks): a main process that failed there left the others in the store's wait to make the
    group, which no closed connection ends, for train.evaluation_timeout (4 h by default), where the next
    collective of the default group they used to reach ends at once."""
    import threading

    from trainer import job

    calls = []

    class Made(Exception):
        pass

    class MainOfTwo:
        world_size, rank, device = 2, 0, torch.device("cpu")

        @property
        def is_main(self):
            calls.append("is_main")
            return True

        def barrier(self):
            calls.append("barrier")

        def wait_for_main(self, timeout, failed=False):
            calls.append(f"wait_for_main({timeout:g})")
            raise Made

    cfg = load_config("toy_25gaussians", [*tiny_overrides(tmp_path, steps=2), "train.evaluation_timeout=77"])
    with pytest.raises(Made):
        job.train(cfg, MainOfTwo(), threading.Event(), "toy_25gaussians")
    assert calls == ["wait_for_main(77)"], calls


def _forge(checkpoint, change):
    """Changes the weights and rewrites files.json, as a tamperer (or a bug) would: only the
    parameter check after the load can tell."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(checkpoint, WEIGHTS_FILE)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = {k: change(v) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata=meta)
    os.remove(os.path.join(checkpoint, "files.json"))
    write_file_list(checkpoint)


@pytest.mark.parametrize(
    "change", [lambda t: t * 1000, lambda t: torch.full_like(t, float("nan"))], ids=["x1000", "nan"]
)
def test_parameters_checked_after_a_load_fall_back_to_the_older_checkpoint(tmp_path, config_yaml, change, caplog):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml)
    older = _save(checkpoints, runtime, 10)
    newer = _save(checkpoints, runtime, 20)
    _forge(newer, change)
    assert damage(newer) is None  # the file list agrees: only the parameters tell
    state = TrainState()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.load_newest(runtime, state, checkpoints.newest_intact(runtime)) == older
    assert state.step == 10 and f"checkpoint {newer} is damaged: {WEIGHTS_FILE}" in caplog.text
    assert all(torch.isfinite(p).all() for m in runtime.nets.values() for p in m.parameters())


class Payload:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_checkpoint_keeps_the_generator_of_the_ranks_own_gpu_only(monkeypatch):
    # All visible GPUs' states, restored by position, raised IndexError on a resume that saw fewer
    # GPUs and left a rank's own generator unrestored on one that saw more. Here the calls are recorded
    # (no GPU): rank 1 of a run on cuda:1 saves and restores cuda:1's state alone.
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.update({index: state}))
    device = torch.device("cuda", 1)
    saved = rng_state(device)
    assert torch.equal(saved["cuda"], states[1])
    set_rng_state(saved, device)
    assert list(restored) == [1] and torch.equal(restored[1], states[1])
    # An older checkpoint's list of every GPU its writer saw: this rank's entry, the only one, or none.
    restored.clear()
    set_rng_state({**saved, "cuda": [states[0], states[1]]}, device)
    assert list(restored) == [1] and torch.equal(restored[1], states[1])
    restored.clear()
    set_rng_state({**saved, "cuda": [states[0], states[1]]}, torch.device("cuda", 2))  # the writer saw fewer
    set_rng_state(saved, torch.device("cpu"))
    assert restored == {}
    set_rng_state({**saved, "cuda": [states[1]]}, device)  # its writer saw one GPU: its own
    assert list(restored) == [1] and torch.equal(restored[1], states[1])
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_a_refused_weights_only_load_names_the_file_and_falls_back(tmp_path, config_yaml, caplog):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml)
    older = _save(checkpoints, runtime, 10)
    newer = _save(checkpoints, runtime, 20)
    rng = os.path.join(newer, "rng_rank0.pt")
    torch.save({"state": Payload()}, rng)
    os.remove(os.path.join(newer, "files.json"))
    write_file_list(newer)
    state = TrainState()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.load_newest(runtime, state, newer) == older
    assert rng in caplog.text and "weights_only=False" not in caplog.text


def test_a_malformed_safetensors_header_names_the_file_and_falls_back(tmp_path, config_yaml, caplog):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml)
    older = _save(checkpoints, runtime, 10)
    newer = _save(checkpoints, runtime, 20)
    path = os.path.join(newer, WEIGHTS_FILE)
    with open(path, "r+b") as f:
        f.write((10**9).to_bytes(8, "little"))  # a header length past the file's end
    assert WEIGHTS_FILE in damage(newer)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.newest_intact(runtime) == older
    os.remove(os.path.join(newer, "files.json"))
    write_file_list(newer)  # the file list agrees: the header check still tells
    assert f"{WEIGHTS_FILE} is unreadable" in damage(newer)
    with pytest.raises(CheckpointError, match=path):
        checkpoints.load(newer, runtime, TrainState())


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device", "weights.safetensors"),
        RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0"),
    ],
    ids=["oserror", "torch"],
)
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path, config_yaml, monkeypatch, failure):
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1)
    older = _save(checkpoints, runtime, 10)
    before = _snapshot(tmp_path / "checkpoints")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr("trainer.checkpoint.save_file", full)
    with pytest.raises(CheckpointError) as caught:
        _save(checkpoints, runtime, 20)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "checkpoints" / "step_00000020") in message
    assert _snapshot(tmp_path / "checkpoints") == before and damage(older) is None  # no partial folder left


def test_the_state_file_must_match_the_folders_step(tmp_path, config_yaml):
    runtime = FakeRuntime()
    written = _save(_checkpoints(tmp_path, config_yaml), runtime, 10)
    path = os.path.join(written, STATE_FILE)
    state = json.load(open(path))
    state["step"] = -5
    with open(path, "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(written, "files.json"))
    write_file_list(written)
    assert STATE_FILE in damage(written)


def test_a_save_is_on_disk_before_any_older_checkpoint_is_deleted(tmp_path, config_yaml, monkeypatch):
    # Nothing was synced: a power loss within the writeback window left the new checkpoint failing its
    # sha256 check, and the older ones already pruned: nothing to resume from.
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1)
    older = _save(checkpoints, runtime, 10)
    events = []
    fsync, rename, rmtree = os.fsync, os.rename, shutil.rmtree

    def recorded_fsync(fd):
        # files.json is synced under its temporary name, before write_replacing renames it
        events.append(("sync", re.sub(r"\.tmp-\d+$", "", os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recorded_rename(source, target):
        events.append(("rename", source))
        rename(source, target)

    def recorded_rmtree(path, *args, **kwargs):
        events.append(("delete", path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "rename", recorded_rename)
    monkeypatch.setattr(shutil, "rmtree", recorded_rmtree)
    written = _save(checkpoints, runtime, 20)
    partial = os.path.realpath(written) + ".partial"
    # The older one leaves the listing when it is renamed to be pruned, and is deleted after it.
    renamed, deleted = events.index(("rename", written + ".partial")), events.index(("rename", older))
    assert events.index(("delete", older + ".pruning")) > deleted
    synced_before_rename = {path for kind, path in events[:renamed] if kind == "sync"}
    for root, _, names in os.walk(written):  # every file and folder, under the name they were synced by
        inside = os.path.join(partial, os.path.relpath(root, written)).removesuffix("/.")
        for path in [inside] + [os.path.join(inside, name) for name in names]:
            assert path in synced_before_rename, path
    assert ("sync", os.path.realpath(checkpoints.folder)) in events[renamed:deleted]


@pytest.mark.parametrize(
    "now, expected, warned",
    [
        ([], StreamPosition(0, 16), None),
        (["data.io_timeout=5", "data.worker_type=process"], StreamPosition(0, 16), None),  # the same order
        (["data.num_workers=2", "data.batch_size=32"], StreamPosition(1, 0),
         "data.batch_size 256 → 32, data.num_workers 1 → 2"),
        (["train.seed=7"], StreamPosition(1, 0), "train.seed 0 → 7"),
        (["data.shuffle_buffer=10"], StreamPosition(1, 0), "data.shuffle_buffer 2000 → 10"),
    ],
)  # fmt: skip
def test_a_resume_with_other_data_settings_starts_the_next_epoch_and_says_why(
    tmp_path, config_yaml, caplog, now, expected, warned
):
    # A position counts batches of the settings it was saved with: resumed mid-epoch with 1 worker
    # instead of 2, a run saw some of the epoch's samples twice and as many never, and said nothing.
    runtime = FakeRuntime()
    written = _checkpoints(tmp_path, config_yaml).save(runtime, TrainState(step=10, position=StreamPosition(0, 16)))
    resumed = Checkpoints(str(tmp_path / "checkpoints"), 3, config_to_yaml(load_config("toy_25gaussians", now)), {})
    state = TrainState()
    with caplog.at_level(logging.WARNING):
        resumed.load(written, runtime, state)
    assert state.step == 10 and state.position == expected
    if warned is None:
        assert not caplog.records
    else:
        assert [r.getMessage().count("\n") for r in caplog.records] == [0]  # one line
        assert f"({warned}): its stream position does not carry over, so the stream starts epoch 1" in caplog.text
        assert written in caplog.text and "Set them back to resume exactly" in caplog.text


def test_a_checkpoint_from_before_the_data_settings_were_kept_resumes_its_position(tmp_path, config_yaml, caplog):
    runtime = FakeRuntime()
    written = _checkpoints(tmp_path, config_yaml).save(runtime, TrainState(step=10, position=StreamPosition(0, 16)))
    path = os.path.join(written, STATE_FILE)
    saved = json.load(open(path))
    del saved["sample_order"]
    with open(path, "w") as f:
        json.dump(saved, f)
    write_file_list(written)
    other = config_to_yaml(load_config("toy_25gaussians", ["data.num_workers=2"]))
    state = TrainState()
    with caplog.at_level(logging.WARNING):
        Checkpoints(str(tmp_path / "checkpoints"), 3, other, {}).load(written, runtime, state)
    assert state.position == StreamPosition(0, 16) and not caplog.records


@pytest.mark.parametrize(
    "positions, expected",
    [
        ([(3, 10), (4, 1)], StreamPosition(5, 0)),  # rank 1's epoch 3 ended early (a corrupt shard)
        ([(2, 0), (2, 0)], StreamPosition(2, 0)),  # saved at an epoch's end: nothing to skip
    ],
)
def test_a_ddp_resume_on_another_number_of_ranks_starts_after_the_newest_epoch_begun(positions, expected):
    # Another world size gives each rank other shards: rank 0's position taken by every rank repeated
    # some samples; every rank starts the same fresh epoch instead.
    saved = TrainState(world_size=2, sample_order={"data.batch_size": 64, "ranks": 2})
    saved.rank_positions = [{"epoch": e, "batches_done": b} for e, b in positions]
    for rank in range(4):
        resumed = TrainState(rank=rank, world_size=4, sample_order={"data.batch_size": 64, "ranks": 4})
        assert resumed.load_json(saved.to_json()) == ["ranks 2 → 4"]
        assert resumed.position == expected


@pytest.mark.slow
def test_the_trainer_resumed_with_other_data_settings_says_so_and_starts_the_next_epoch(tmp_path):
    run_trainer(tiny_overrides(tmp_path, steps=10))  # 10 steps of 2 batches: epoch 0, 20 batches done
    resumed = run_trainer(tiny_overrides(tmp_path, steps=20) + ["data.num_workers=2", "data.batch_size=32"])
    assert "resumed from step 10" in resumed.stdout
    assert "(data.batch_size 64 → 32, data.num_workers 1 → 2)" in resumed.stderr
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000020" / STATE_FILE).read_text())
    assert state["rank_positions"] == [{"epoch": 1, "batches_done": 20}]


# -- class 4: the guard escapes a bad checkpoint ------------------------------------------------------


def test_the_guard_goes_one_checkpoint_further_back_when_a_failure_repeats():
    guard = DivergenceGuard(GuardConfig(max_rollbacks=3, lr_factor=0.5))
    first = Diverged("out-of-bound energy_gap = 1e9 at step 21", step=21, term="energy_gap")
    assert not guard.flee_repeated(first, "ckpt/step_00000020")
    guard.next_rollback(first, "ckpt/step_00000020")
    again = Diverged("out-of-bound energy_gap = 2e9 at step 21", step=21, term="energy_gap")
    assert guard.flee_repeated(again, "ckpt/step_00000020") and guard.fled == ["ckpt/step_00000020"]
    guard.next_rollback(again, "ckpt/step_00000010")
    guard.rollbacks = 3
    stop = guard.give_up(again, "ckpt/step_00000010")
    assert "diverge from checkpoint ckpt/step_00000020 at the next step regardless of the learning rate" in str(stop)
    assert "Lower the learning rates" not in str(stop)


def test_the_guard_never_flees_step_0_and_advises_lower_learning_rates_when_the_first_steps_fail():
    # train.energy_optim.lr=100: step 1 failed again from step 0 at half the rate; step 0 was fled and the
    # run stopped with 2 rollbacks unused, blaming "the data or the model at that step".
    guard = DivergenceGuard(GuardConfig(max_rollbacks=3, lr_factor=0.5))
    start = "ckpt/step_00000000"
    for _ in range(4):
        error = Diverged("non-finite energy_gap = nan at step 1", True, 1, "energy_gap")
        assert not guard.flee_repeated(error, start)
        if guard.rollbacks < 3:
            guard.next_rollback(error, start)
    assert guard.fled == [] and guard.rollbacks == 3
    stop = str(guard.give_up(error, start))
    assert "3 rollback(s) did not help" in stop and "Lower the learning rates" in stop and "the data" not in stop


def test_the_guard_blames_the_data_when_a_failure_comes_back_from_a_fled_checkpoint_and_from_step_0():
    guard = DivergenceGuard(GuardConfig(max_rollbacks=3, lr_factor=0.5))
    for loaded in ("ckpt/step_00000020", "ckpt/step_00000020", "ckpt/step_00000000", "ckpt/step_00000000"):
        guard.flee_repeated(Diverged("non-finite penalty at step 25", True, 25, "penalty"), loaded)
    assert guard.fled == ["ckpt/step_00000020"] and guard.repeated_from_start
    stop = str(guard.give_up(Diverged("non-finite penalty at step 25", True, 25, "penalty"), "ckpt/step_00000000"))
    assert "from every checkpoint tried (ckpt/step_00000020, and step 0)" in stop and "the data" in stop


def test_the_guard_advises_lower_learning_rates_when_failures_differ():
    guard = DivergenceGuard(GuardConfig(max_rollbacks=1))
    for step in (21, 34):
        error = Diverged(f"non-finite penalty at step {step}", True, step, "penalty")
        assert not guard.flee_repeated(error, "ckpt/step_00000020")
    assert "Lower the learning rates" in str(guard.give_up(error, "ckpt/step_00000030"))


def test_the_guard_does_not_flee_when_the_learning_rate_is_not_lowered():
    guard = DivergenceGuard(GuardConfig(lr_factor=1.0))
    error = Diverged("x", step=21, term="energy_gap")
    assert not guard.flee_repeated(error, "a") and not guard.flee_repeated(error, "a")


@pytest.mark.slow
def test_a_checkpoint_whose_weights_explode_is_escaped(tmp_path):
    run_trainer(tiny_overrides(tmp_path, steps=20), timeout=240)
    bad = tmp_path / "run" / "checkpoints" / "step_00000020"

    def explode(name, tensor):
        # The energy's output layer x2000: finite, moderate norms, an energy gap past its bound at once.
        return tensor * 2000 if name.startswith("energy.") and name.endswith(("weight", "bias")) else tensor

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = bad / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    last = max(k for k in tensors if k.startswith("energy.") and k.endswith("weight"))
    tensors = {k: explode(k, v) if k.rsplit(".", 1)[0] == last.rsplit(".", 1)[0] else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    state = json.loads((bad / STATE_FILE).read_text())
    state.pop("param_norms")  # as an older version wrote it: only the guard can tell
    (bad / STATE_FILE).write_text(json.dumps(state))
    (bad / "files.json").unlink()
    write_file_list(str(bad))
    result = run_trainer(tiny_overrides(tmp_path, steps=30) + ["train.guard.max_abs_energy_gap=500"], timeout=240)
    assert "resumed from step 20" in result.stdout
    assert "rolled back to step 20" in result.stdout and "rolled back to step 10" in result.stdout, result.stdout
    assert "finished:" in result.stdout
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step_00000020.fled").is_dir()  # kept, not overwritten
    assert f"checkpoint {checkpoints / 'step_00000020'} diverges again at the next step" in result.stderr
    assert not list(checkpoints.glob("*.replaced*"))  # set aside at once: the new step 20 took its place


def test_a_restart_after_the_guard_fled_a_checkpoint_does_not_resume_it(tmp_path, config_yaml):
    """The guard's flight outlives the process: the fled checkpoint stays set aside."""
    runtime = FakeRuntime()
    checkpoints = _checkpoints(tmp_path, config_yaml, keep=1, keep_first=True)
    for step in (0, 2000):
        _save(checkpoints, runtime, step)
    guard, fled = DivergenceGuard(GuardConfig(lr_factor=0.5)), str(tmp_path / "checkpoints" / "step_00002000")
    for _ in range(2):  # the same failure from step 2000 twice: fled, as MEGTrainer._roll_back does
        if guard.flee_repeated(Diverged("x", step=2050, term="energy_gap"), fled):
            checkpoints.set_aside_fled(runtime, fled)
    _save(checkpoints, runtime, 1800)  # the lowered-rate trajectory, stopped at 1800
    restarted = _checkpoints(tmp_path, config_yaml, keep=1, keep_first=True)
    assert restarted.newest_intact(runtime) == str(tmp_path / "checkpoints" / "step_00001800")
    assert (tmp_path / "checkpoints" / "step_00002000.fled").is_dir()


def test_a_partial_save_that_is_a_link_is_unlinked_not_followed(tmp_path, victim):
    from trainer.checkpoint import _remove

    partial = tmp_path / "step_00000010.partial"
    partial.symlink_to(victim.parent)
    _remove(str(partial))
    assert not os.path.lexists(partial) and victim.exists()


def test_a_config_that_does_not_parse_is_a_damaged_checkpoint(tmp_path, config_yaml):
    written = _save(_checkpoints(tmp_path, config_yaml), FakeRuntime(), 10)
    with open(os.path.join(written, "config.yaml"), "w") as f:
        f.write("model: [unclosed\n")
    os.remove(os.path.join(written, "files.json"))
    write_file_list(written)
    assert "config.yaml is unreadable" in damage(written)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "- model\n", "just words\n"])
def test_a_config_that_is_not_a_mapping_is_a_damaged_checkpoint(tmp_path, config_yaml, text):
    # An empty config.yaml (or a list) in a checkpoint whose files.json agrees with it (an older
    # version's, a copy) was an AttributeError traceback from the resume and the sample/evaluate tools.
    written = _save(_checkpoints(tmp_path, config_yaml), FakeRuntime(), 10)
    with open(os.path.join(written, "config.yaml"), "w") as f:
        f.write(text)
    os.remove(os.path.join(written, "files.json"))
    write_file_list(written)
    assert "config.yaml is unreadable: config.yaml must hold a mapping of config sections" in damage(written)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the process tree is read from /proc")
def test_a_trainer_that_exits_at_once_ends_the_commands_it_started_and_theirs(tmp_path):
    # A pipe: shard's command (and the sleep it ran) outlived a trainer the stop watchdog ended.
    code = (
        "import os, subprocess, time\n"
        "from trainer.main import descendants, exit_now\n"
        "subprocess.Popen(['sh', '-c', 'sleep 1000 & sleep 1000 & wait'], stdout=subprocess.DEVNULL)\n"
        "time.sleep(1)\n"
        "print(*descendants(os.getpid()), flush=True)\n"
        "exit_now(75)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    started = [int(pid) for pid in done.stdout.split()]
    assert done.returncode == 75 and len(started) == 3, (done.stdout, done.stderr[-2000:])  # sh and its two sleeps
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, started)):
        time.sleep(0.1)
    assert not any(map(_alive, started)), started


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc")
def test_process_workers_end_with_a_killed_trainer_and_a_restart_gets_the_lock(tmp_path):
    args = [*tiny_overrides(tmp_path, steps=100_000), "data.worker_type=process", "data.num_workers=2"]
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", *args]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 120, []
        while time.time() < deadline and not workers:  # an epoch's DataLoader workers
            time.sleep(0.2)
            workers = descendants(first.pid)
        assert workers, "no worker processes"
        time.sleep(0.5)  # past their start-up (worker_init_fn)
    finally:
        first.kill()
        first.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "a worker outlived the trainer"
    result = run_trainer([*tiny_overrides(tmp_path, steps=20), "data.worker_type=process"], check=False, timeout=240)
    assert "in use by another trainer" not in result.stderr and result.returncode == 0, result.stderr
