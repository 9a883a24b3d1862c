"""Every wait ends: storage that accepts a connection and never answers (data.io_timeout), a rank that
stops answering (train.collective_timeout), and SIGTERM honoured within 30 s in every state with exit
75 (start-up on storage, the rendezvous, training with a blocked reader, through the launcher); a run
that still trains is not cut short, but stops at its next metric reduction with a checkpoint."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, accelerate_launcher, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow
pytest.importorskip("aiohttp")  # fsspec's http backend: the stores here are http servers

TRAINER = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians"]


class SilentServer:
    """Accepts every connection and never sends a byte: a store that hangs."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


SLOW_SECONDS = 5.0  # slow storage: within the data wait's patience after a stop (DATA_STOP_PATIENCE_SECONDS)


class HangingFiles(SimpleHTTPRequestHandler):
    """Serves a folder until ``hang`` is set; then accepts requests and never answers them."""

    hang = threading.Event()
    release = threading.Event()
    slow_next = threading.Event()  # the next request is answered after SLOW_SECONDS
    slowed = threading.Event()  # ... and it has come

    def handle_one_request(self):
        if self.hang.is_set():
            self.release.wait()
            return
        if self.slow_next.is_set():
            self.slow_next.clear()
            self.slowed.set()
            time.sleep(SLOW_SECONDS)
        super().handle_one_request()

    def log_message(self, *args):
        pass


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def http_data(tmp_path):
    """Toy shards served over http (a store that can be made to hang): (url, handler class)."""
    from data_pipeline.convert import convert_toy

    convert_toy("25gaussians", str(tmp_path / "data"), 4096, 4, seed=0)
    events = ("hang", "release", "slow_next", "slowed")
    handler = type("Handler", (HangingFiles,), {name: threading.Event() for name in events})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path / "data")))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    handler.release.set()
    server.shutdown()


def start(cmd: list[str], tmp_path: Path, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Output to files: a pipe nobody reads could itself block the trainer.
    out, err = (open(tmp_path / f"{name}.{s}", "wb") for s in ("out", "err"))  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or subprocess_env(), stdout=out, stderr=err)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def stop_and_time(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    sent = time.time()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("still running 40 s after the signal") from None
    return time.time() - sent


def no_data_overrides(tmp_path: Path, steps: int = 20) -> list[str]:
    return [o for o in tiny_overrides(tmp_path, steps) if not o.startswith("data.url")] + ["data.toy="]


def test_start_up_on_a_silent_store_fails_after_the_retries_and_a_sigterm_ends_it_at_once(tmp_path, silent):
    url = f"http://127.0.0.1:{silent.port}/data"
    args = [*no_data_overrides(tmp_path), f"data.url={url}"]
    # Two runs at once: one left alone (io_timeout x 3 attempts + 1 s + 2 s pauses), one stopped.
    alone = start([*TRAINER, *args, "data.io_timeout=2", f"output_dir={tmp_path / 'alone'}"], tmp_path, "alone")
    stopped = start([*TRAINER, *args, f"output_dir={tmp_path / 'stopped'}"], tmp_path, "stopped")
    began = time.time()
    try:
        wait_for(lambda: len(silent.accepted) >= 2, 90, "both trainers to wait on the store")
        time.sleep(1)
        assert stopped.poll() is None
        took = stop_and_time(stopped)
        assert stopped.returncode == 75 and took < 30, (took, (tmp_path / "stopped.err").read_text()[-2000:])
        assert "while waiting for storage" in (tmp_path / "stopped.err").read_text()
        alone.wait(timeout=90)
        err = (tmp_path / "alone.err").read_text()
        assert alone.returncode == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
        assert f"{url}/manifest.json" in errors[0] and "data.io_timeout=2" in errors[0] and "3 attempts" in errors[0]
        assert err.count("retrying in") == 2 and time.time() - began >= 2 * 3 + 3
    finally:
        for p in (alone, stopped):
            p.kill()
            p.wait()


def test_a_sigterm_while_a_reader_is_blocked_mid_training_checkpoints_and_exits_75(tmp_path, http_data):
    url, handler = http_data
    args = [*no_data_overrides(tmp_path, steps=100_000), f"data.url={url}", "checkpoint.every=100000"]
    proc = start([*TRAINER, *args], tmp_path, "train")
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000000").exists(), 90, "training to start")
        time.sleep(1)
        handler.hang.set()  # the next shard reads block in their sockets
        time.sleep(3)
        assert proc.poll() is None, (tmp_path / "train.err").read_text()[-2000:]
        took = stop_and_time(proc)
        err = (tmp_path / "train.err").read_text()
        assert proc.returncode == 75 and took < 30, (took, err[-2000:])
        assert "checkpoint saved at step" in err and "Traceback" not in err, err[-2000:]
        saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert len(saved) == 2 and saved[-1] != "step_00000000", saved
    finally:
        proc.kill()
        proc.wait()


def test_a_sigterm_during_the_rendezvous_exits_75_although_python_cannot_run_its_handler(tmp_path):
    """A rank whose peers never come waits inside torch's C++ rendezvous: the watchdog ends it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env()
    env.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(ACCELERATE_USE_CPU="1", MEG_STOP_GRACE_S="3")
    proc = start([*TRAINER, *tiny_overrides(tmp_path)], tmp_path, "rank", env)
    try:
        time.sleep(12)  # imports done, waiting for rank 0
        assert proc.poll() is None, (tmp_path / "rank.err").read_text()[-2000:]
        took = stop_and_time(proc)
        err = (tmp_path / "rank.err").read_text()
        # the watchdog's 3 s, not the rendezvous timeout (minutes); slack for a loaded machine
        assert proc.returncode == 75 and took < 3 + 30, (took, err[-2000:])
        assert "did not end within 3 s of the stop signal" in err
    finally:
        proc.kill()
        proc.wait()


def first_reduction(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and '"energy_loss"' in metrics.read_text()


def test_a_run_that_trains_on_past_the_grace_stops_at_its_next_reduction_with_a_checkpoint(tmp_path):
    """The watchdog is for a process blocked in a wait: one that makes progress is not cut short
    when its next metric reduction is further away than the grace (a slow step, a large log.every)."""
    every = 1000  # about 10 s of this toy run's steps on one loaded CPU, 3 s on a fast one: past the 2 s
    env = subprocess_env()
    env["MEG_STOP_GRACE_S"] = "2"
    args = [*tiny_overrides(tmp_path, 100_000), f"log.every={every}", "checkpoint.every=100000"]
    proc = start([*TRAINER, *args], tmp_path, "train", env)
    try:
        wait_for(lambda: first_reduction(tmp_path / "run"), 120, f"the reduction at step {every}")
        stop_and_time(proc)  # the next reduction is a whole log interval away
        err = (tmp_path / "train.err").read_text()
        assert proc.returncode == 75 and "did not end within" not in err, err[-2000:]
        assert f"checkpoint saved at step {2 * every}" in err, err[-2000:]
        assert (tmp_path / "run" / "checkpoints" / f"step_{2 * every:08d}").is_dir()
    finally:
        proc.kill()
        proc.wait()


def two_ranks(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    launcher, env = accelerate_launcher(2)
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", *tiny_overrides(tmp_path, 100_000), *extra]
    return start(cmd, tmp_path, "job", env), env


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """The launcher's workers by rank."""
    ranks = {}
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(v for v in env if v.startswith(b"RANK="))
            ranks[int(rank[5:])] = int(pid)
    return ranks


def test_a_stopped_rank_ends_the_job_within_the_collective_timeout_with_one_line(tmp_path):
    proc, _ = two_ranks(tmp_path, "train.collective_timeout=10", "checkpoint.every=100000")
    stopped = None
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000000").exists(), 120, "training to start")
        time.sleep(1)
        stopped = worker_pids(proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)  # a hung node
        sent = time.time()
        proc.wait(timeout=120)
        took = time.time() - sent
        err = (tmp_path / "job.err").read_text()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "rank 0 of 2" in errors[0] and "train.collective_timeout=10" in errors[0], err
        assert "Traceback" not in err and proc.returncode != 0, err[-3000:]
        # the 10 s timeout, then the launcher ends the stopped rank (SIGCONT + SIGTERM); not the default timeout
        assert took < 10 + 60, took
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_a_rank_that_fails_alone_stops_every_rank_at_once_and_they_name_it(tmp_path):
    # The failing rank met the others on its way out (job.run's shutdown barrier) while they waited for it
    # in the metric reduction: both waited out train.collective_timeout (600 s by default), the others then
    # saying that a rank "did not answer (hung, stopped or lost)". Now it leaves without meeting them, its
    # one line in the launcher's store, and they stop as its connections close, naming it.
    from trainer.checkpoint import damage, list_checkpoints

    proc, _ = two_ranks(tmp_path, "train.collective_timeout=300")
    checkpoints = tmp_path / "run" / "checkpoints"
    try:
        wait_for(lambda: (checkpoints / "step_00000020").exists(), 120, "training to go on")
        next((tmp_path / "data").glob("*.tar")).unlink()  # read by one rank only, at its next epoch: a DataError
        try:
            proc.wait(timeout=120)  # far below the 300 s collective timeout
        except subprocess.TimeoutExpired:
            raise AssertionError("the job outlived the failed rank by 120 s: the others wait it out") from None
        err = (tmp_path / "job.err").read_text()
        failed = re.search(r"rank (\d) of 2 stops: DataError: shard \S+ has disappeared", err)
        named = re.search(r"error: CollectiveError: rank (\d) of 2: rank (\d) failed \(DataError: shard \S+ has", err)
        assert proc.returncode not in (0, 75) and failed and named, err[-3000:]
        assert named[2] == failed[1] != named[1], err[-3000:]  # the other rank names the failed one
        assert "did not answer" not in err and "Traceback" not in err, err[-3000:]
        assert damage(list_checkpoints(str(checkpoints))[-1]) is None
    finally:
        proc.kill()
        proc.wait()


FAILING_STEP = """
import os, runpy, sys
if os.environ["RANK"] == "0":  # rank 0's 26th step raises (an error of its own: a bug, out of memory)
    from trainer import steps
    iteration, calls = steps.MEGSteps.iteration, []
    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 25:
            raise RuntimeError("this rank's own step failed")
        return iteration(self, *args, **kwargs)
    steps.MEGSteps.iteration = failing
sys.argv[0] = "trainer/main.py"
runpy.run_path("trainer/main.py", run_name="__main__")
"""


def test_a_rank_whose_step_raises_ends_at_once_with_its_traceback_and_the_others_name_it(tmp_path):
    # Such an error (not the user's) leaves main() with its traceback: the interpreter's exit then tore
    # down the group the rank had left without meeting the others, and ended only with the launcher's
    # SIGTERM (exit -15, the launcher naming the other rank first).
    from trainer.checkpoint import damage, list_checkpoints

    script = tmp_path / "failing_main.py"
    script.write_text(FAILING_STEP)
    launcher, env = accelerate_launcher(2)
    cmd = [*launcher, str(script), "--config", "toy_25gaussians", *tiny_overrides(tmp_path, 100_000)]
    proc = start([*cmd, "train.collective_timeout=300"], tmp_path, "job", env)
    try:
        try:
            proc.wait(timeout=120)  # far below the 300 s collective timeout
        except subprocess.TimeoutExpired:
            raise AssertionError("the job outlived the failed rank by 120 s: the others wait it out") from None
        err = (tmp_path / "job.err").read_text()
        assert "rank 0 of 2 stops: RuntimeError: this rank's own step failed" in err and "Traceback" in err, err[-3000:]
        assert (
            "error: CollectiveError: rank 1 of 2: rank 0 failed (RuntimeError: this rank's own step failed)" in err
        ), err[-3000:]
        assert "launcher: a process failed (rank 0: exit 1, rank 1: exit 2; rank 0 first); exit 1" in err, err[-3000:]
        assert proc.returncode == 1 and "did not answer" not in err, err[-3000:]
        assert damage(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1]) is None
    finally:
        proc.kill()
        proc.wait()


def test_the_launcher_passes_sigterm_on_and_exits_with_the_requeue_code(tmp_path):
    proc, _ = two_ranks(tmp_path, "checkpoint.every=100000")
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000000").exists(), 120, "training to start")
        time.sleep(1)
        took = stop_and_time(proc)  # the launcher only, not its process group
        err = (tmp_path / "job.err").read_text()
        assert proc.returncode == 75 and took < 30, (took, err[-3000:])
        assert err.count("checkpoint saved at step") == 2 and "Traceback" not in err, err[-3000:]
        assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2
    finally:
        proc.kill()
        proc.wait()


def test_the_launcher_waits_through_repeated_signals_for_ranks_on_their_way_to_the_reduction(tmp_path, monkeypatch):
    # meg.sbatch repeats its warning every 30 s: the repeats used to end the agent in its wait for the
    # workers (exit 143), and with it, under Slurm, the workers before their checkpoint.
    monkeypatch.setenv("MEG_STOP_GRACE_S", "2")
    every = 300  # about 8 s of two ranks' steps on two loaded CPUs: past the workers' 2 s grace
    proc, _ = two_ranks(tmp_path, f"log.every={every}", "checkpoint.every=100000")
    try:
        wait_for(lambda: first_reduction(tmp_path / "run"), 120, f"the reduction at step {every}")
        for _ in range(2):  # torch's agent survives one repeat (it starts its wait over), not two
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)
        stop_and_time(proc)  # while the ranks still train towards step 2 * every
        err = (tmp_path / "job.err").read_text()
        assert proc.returncode == 75 and "did not end within" not in err and "Traceback" not in err, err[-3000:]
        assert err.count(f"checkpoint saved at step {2 * every}") == 2, err[-3000:]
        assert (tmp_path / "run" / "checkpoints" / f"step_{2 * every:08d}").is_dir()
    finally:
        proc.kill()
        proc.wait()


def test_ranks_stopped_while_one_waits_for_slow_storage_save_together_at_their_reduction(tmp_path, http_data):
    # The waiting rank gave up at once: the job exited 75 at the newest checkpoint, losing every step since.
    url, handler = http_data
    every = 200  # the stop lands in a wait for data: several epochs of reads before the next reduction
    launcher, env = accelerate_launcher(2)
    args = [*no_data_overrides(tmp_path, 100_000), f"data.url={url}", f"log.every={every}", "checkpoint.every=100000"]
    proc = start([*launcher, *TRAINER[1:], *args], tmp_path, "job", env)
    try:
        wait_for(lambda: first_reduction(tmp_path / "run"), 180, f"the reduction at step {every}")
        handler.slow_next.set()
        wait_for(handler.slowed.is_set, 60, "a shard read from the slow store")
        took = stop_and_time(proc)
        err = (tmp_path / "job.err").read_text()
        assert proc.returncode == 75 and "Traceback" not in err, (took, err[-3000:])
        assert err.count("checkpoint saved at step") == 2 and "the newest checkpoint stands" not in err, err[-3000:]
        assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2
    finally:
        proc.kill()
        proc.wait()


class _TwoRanks:
    rank, world_size = 1, 2

    def __init__(self):
        self.met = None

    def shutdown(self, meet=True):
        self.met = meet


@pytest.mark.parametrize(
    "error, says",
    [
        ("Timed out waiting 10000ms for send operation to complete", "did not answer within"),
        ("Connection closed by peer [127.0.0.1]:29500", "another rank ended"),
        (
            "[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1: Application timeout caused pair closure",
            "did not answer within",
        ),
        ("NCCL error in: ProcessGroupNCCL.cpp:2010, unhandled system error", "unhandled system error"),
        # As DDP's backward hooks raise it: a plain RuntimeError, no gloo prefix (it was a raw traceback).
        ("Application timeout caused pair closure", "did not answer within"),
    ],
)
@pytest.mark.parametrize("kind", ["DistBackendError", "RuntimeError"])
def test_a_failed_collective_says_what_failed(error, says, kind):
    # Every NCCL failure is a DistBackendError: a rank's own (a system or CUDA error) used to be told
    # as "another rank ended", the cause dropped.
    import torch.distributed as dist

    from trainer.runtime import collective_failure

    raised = dist.DistBackendError(error) if kind == "DistBackendError" else RuntimeError(error)
    message = str(collective_failure(raised, _TwoRanks(), 600))
    assert "rank 1 of 2: a collective failed" in message and says in message, message
    assert ("another rank ended" in message) == ("closed by peer" in error), message


def test_a_failure_of_one_rank_is_said_and_left_in_the_store_and_it_leaves_without_meeting_the_others(
    monkeypatch, tmp_path, caplog
):
    # Such a rank met the others in shutdown's barrier while they waited in another collective: each side
    # waited out train.collective_timeout (under NCCL the watchdog aborted it before the error was printed).
    import logging
    import threading

    from trainer import job
    from trainer.config import load_config

    runtime, reported = _TwoRanks(), []
    monkeypatch.setattr(job, "report_failure", lambda *args: reported.append(args))
    monkeypatch.setattr(job, "build_runtime", lambda cfg: runtime)

    def train(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(job, "train", train)
    cfg = load_config("toy_25gaussians", [f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="out of memory"):
        job.run(cfg, threading.Event())
    assert "rank 1 of 2 stops: RuntimeError: CUDA out of memory" in caplog.text and runtime.met is False
    assert [(rank, world_size, str(error)) for rank, world_size, error in reported] == [
        (1, 2, "CUDA out of memory. Tried to allocate 2.00 GiB")
    ]


class _MissedMeeting(_TwoRanks):
    def shutdown(self, meet=True):
        super().shutdown(meet)
        if meet:
            raise RuntimeError("Application timeout caused pair closure")


@pytest.mark.parametrize("trained", [True, False])
def test_a_meeting_the_other_ranks_miss_at_the_end_is_one_line_not_a_traceback(monkeypatch, tmp_path, caplog, trained):
    # Ranks that failed together (a configuration) meet before they leave; when another is hung, that
    # meeting's timeout was raised from job.run's finally and replaced the rank's own error with a traceback.
    import logging
    import threading

    from trainer import job
    from trainer.config import ConfigError, load_config
    from trainer.runtime import CollectiveError

    runtime = _MissedMeeting()
    monkeypatch.setattr(job, "build_runtime", lambda cfg: runtime)

    def train(*args):
        if not trained:
            raise ConfigError("data.batch_size=100 must be divisible by the 3 ranks")
        return {}

    monkeypatch.setattr(job, "train", train)
    cfg = load_config("toy_25gaussians", [f"output_dir={tmp_path / 'run'}", "train.collective_timeout=10"])
    with caplog.at_level(logging.ERROR), pytest.raises((RuntimeError, ConfigError)) as caught:
        try:  # a caller handling an error of its own: sys.exc_info() in a finally sees it too
            raise ValueError("the caller's")
        except ValueError:
            job.run(cfg, threading.Event())
    if trained:
        assert type(caught.value) is CollectiveError and "collective_timeout=10" in str(caught.value)
    else:
        assert "divisible by the 3 ranks" in str(caught.value), caught.value
        assert "rank 1 of 2: a collective failed: another rank did not answer" in caplog.text
    assert runtime.met is True


def _run_stopped_as_a_collective_fails(monkeypatch, tmp_path, error: str, raises: type):
    """job.run on rank 1 of 2 whose training gets a stop signal (the launcher's, once a rank failed) and
    then the collective error ``error``; returns the runtime and what ``raises`` caught."""
    import threading

    import torch.distributed as dist

    from trainer import job
    from trainer.config import load_config

    runtime, stop = _TwoRanks(), threading.Event()
    monkeypatch.setattr(job, "build_runtime", lambda cfg: runtime)

    def train(*args):
        stop.set()
        raise dist.DistBackendError(error)

    monkeypatch.setattr(job, "train", train)
    cfg = load_config("toy_25gaussians", [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(raises) as caught:
        job.run(cfg, stop)
    return runtime, caught


def test_a_collective_that_fails_after_a_stop_signal_is_a_preemption(monkeypatch, tmp_path):
    # Once one rank fails, the launcher stops the others: their collectives then fail too, and each
    # such rank used to print its own "error:" line beside the one that says what happened.
    from trainer.meg_trainer import Preempted

    runtime, caught = _run_stopped_as_a_collective_fails(
        monkeypatch, tmp_path, "Timed out waiting 10000ms for recv operation to complete", Preempted
    )
    assert not caught.value.checkpointed and runtime.met is False


def test_a_collective_that_fails_after_another_rank_said_it_failed_names_that_rank(monkeypatch, tmp_path):
    # The launcher stops the others once one failed, often before their collective fails as it leaves:
    # that was told as a preemption ("stop signal received as the other ranks stopped", exit 75).
    from trainer.runtime import CollectiveError, group

    monkeypatch.setattr(group, "reported_failure", lambda: (0, "DataError: shard s.tar has disappeared"))
    runtime, caught = _run_stopped_as_a_collective_fails(
        monkeypatch, tmp_path, "Connection closed by peer [127.0.0.1]:29500", CollectiveError
    )
    assert str(caught.value).startswith(
        "rank 1 of 2: rank 0 failed (DataError: shard s.tar has disappeared); this rank stops too"
    ), caught.value
    assert caught.value.failed_rank == 0 and runtime.met is False


def ctrl_c(proc: subprocess.Popen) -> None:
    """A terminal's Ctrl-C: SIGINT to the whole foreground process group (the data workers too)."""
    os.killpg(proc.pid, signal.SIGINT)


def at_a_terminal() -> None:
    """SIGINT as a terminal's foreground job has it: a suite started in the background of a script
    (``cmd &``, nohup) passes SIGINT on ignored, which the trainer rightly keeps ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_in_own_group(tmp_path: Path, *extra: str) -> subprocess.Popen:
    out, err = (open(tmp_path / f"train.{s}", "wb") for s in ("out", "err"))  # noqa: SIM115
    cmd = [*TRAINER, *tiny_overrides(tmp_path, 100_000), "checkpoint.every=100000", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=out, stderr=err, start_new_session=True,
        preexec_fn=at_a_terminal,
    )  # fmt: skip


def test_a_ctrl_c_stops_at_the_next_reduction_with_a_checkpoint_and_no_traceback(tmp_path):
    every = 50
    proc = start_in_own_group(tmp_path, f"log.every={every}")
    try:
        wait_for(lambda: first_reduction(tmp_path / "run"), 120, f"the reduction at step {every}")
        ctrl_c(proc)
        proc.wait(timeout=60)
        err = (tmp_path / "train.err").read_text()
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert "Ctrl-C again to quit at once" in err, err[-2000:]
        saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name != "step_00000000"]
        assert len(saved) == 1 and f"checkpoint saved at step {int(saved[0][5:])}" in err, (saved, err[-2000:])
    finally:
        proc.kill()
        proc.wait()


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tmp_path):
    proc = start_in_own_group(tmp_path, "log.every=100000")  # the stop's reduction is far away
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000000").is_dir(), 120, "training")
        # The folder appears as step 0's save publishes it, just before the ranks agree whether a stop came
        # during the set-up; a Ctrl-C in that moment rightly ends the run at once (seen once in CI).
        time.sleep(3)
        ctrl_c(proc)
        wait_for(lambda: "Ctrl-C again" in (tmp_path / "train.err").read_text(), 20, "the first Ctrl-C's message")
        time.sleep(1)  # still training: one Ctrl-C alone does not end it
        assert proc.poll() is None, (tmp_path / "train.err").read_text()[-2000:]
        ctrl_c(proc)
        proc.wait(timeout=10)
        err = (tmp_path / "train.err").read_text()
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert "exiting at once" in err, err[-2000:]
    finally:
        proc.kill()
        proc.wait()
