"""Tries the ways a MEG job can wait through the real command lines and counts what happens: hangs, exit
codes, tracebacks, seconds from SIGTERM (or start) to exit. Not collected by pytest.

    PYTHONPATH=. python tests/scripts/adversarial_waits.py [--only NAME ...]

Stores that hang are local: a TCP server that accepts and never answers, an http server that serves toy
shards until told to hang. A process still alive 40 s after its signal (or past its deadline) is a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import accelerate_launcher, subprocess_env, tiny_overrides  # noqa: E402
from tests.test_waits import HangingFiles, SilentServer, worker_pids  # noqa: E402

TRAINER = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians"]
HANG_AFTER_S = 40


def serve(folder: Path):
    handler = type("Handler", (HangingFiles,), {"hang": threading.Event(), "release": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", handler


def run_case(cmd, work: Path, env=None, ready=None, act=None, sig=signal.SIGTERM, deadline=120.0) -> dict:
    """Starts ``cmd``; once ``ready()`` holds, runs ``act(proc)`` (default: sends ``sig``) and times
    the exit from then. Without ``ready``, times the exit from the start."""
    out, err = open(work / "out", "wb"), open(work / "err", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(), stdout=out, stderr=err, start_new_session=True)
    t0 = time.time()
    result: dict = {}
    try:
        if ready is not None:
            while not ready() and time.time() - t0 < deadline and proc.poll() is None:
                time.sleep(0.2)
            if proc.poll() is not None:
                result["note"] = "ended before the signal"
            else:
                t0 = time.time()
                (act or (lambda p: p.send_signal(sig)))(proc)
        limit = HANG_AFTER_S if ready is not None else deadline
        try:
            proc.wait(timeout=limit)
            result.update(exit=proc.returncode, seconds=round(time.time() - t0, 1), hang=False)
        except subprocess.TimeoutExpired:
            result.update(exit=None, seconds=None, hang=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()
        err.close()
    text = (work / "err").read_text(errors="replace")
    result["traceback"] = "Traceback" in text
    if result["traceback"]:
        result["traceback_tail"] = text[text.index("Traceback") :].strip().splitlines()[-3:]
    result["error_lines"] = sum(line.startswith("error:") for line in text.splitlines())
    result["last"] = text.strip().splitlines()[-1][:160] if text.strip() else ""
    return result


def exists(path: Path):
    return lambda: path.exists()


def base(work: Path, steps=100_000) -> list[str]:
    return [o for o in tiny_overrides(work, steps) if not o.startswith("data.url")] + ["data.toy="]


def toy_data(work: Path) -> Path:
    from data_pipeline.convert import convert_toy

    convert_toy("25gaussians", str(work / "data"), 4096, 4, seed=0)
    return work / "data"


def case_startup_silent_sigterm(work):
    s = SilentServer()
    cmd = [*TRAINER, *base(work), f"data.url=http://127.0.0.1:{s.port}/d"]
    return run_case(cmd, work, ready=lambda: bool(s.accepted))


def case_startup_silent_shards_sigterm(work):
    s = SilentServer()
    cmd = [*TRAINER, *base(work), f"data.url=http://127.0.0.1:{s.port}/x-{{000000..000003}}.tar"]
    return run_case(cmd, work, ready=lambda: bool(s.accepted))


def case_startup_silent_no_signal(work):
    s = SilentServer()
    cmd = [*TRAINER, *base(work), f"data.url=http://127.0.0.1:{s.port}/d", "data.io_timeout=3"]
    return run_case(cmd, work, deadline=60)


def case_startup_silent_sigusr1(work):
    s = SilentServer()
    cmd = [*TRAINER, *base(work), f"data.url=http://127.0.0.1:{s.port}/d"]
    return run_case(cmd, work, ready=lambda: bool(s.accepted), sig=signal.SIGUSR1)


def _mid_training(work, extra=(), sig=signal.SIGTERM, signal_it=True):
    url, handler = serve(toy_data(work))
    cmd = [*TRAINER, *base(work), f"data.url={url}", "checkpoint.every=100000", *extra]
    started = exists(work / "run" / "checkpoints" / "step_00000000")

    def ready():
        if started() and not handler.hang.is_set():
            time.sleep(1)
            handler.hang.set()
            ready.at = time.time()
        return handler.hang.is_set() and time.time() - ready.at > 3

    if not signal_it:
        return run_case(cmd, work, deadline=90)
    result = run_case(cmd, work, ready=ready, sig=sig)
    result["checkpoints"] = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
    return result


def case_mid_training_blocked_reader_sigterm(work):
    return _mid_training(work)


def case_mid_training_blocked_reader_sigusr1(work):
    return _mid_training(work, sig=signal.SIGUSR1)


def case_mid_training_blocked_process_workers_sigterm(work):
    return _mid_training(work, ["data.worker_type=process"])


def case_mid_training_blocked_reader_no_signal(work):
    # The store hangs from the second epoch on: the run must stop with an error, not wait forever.
    url, handler = serve(toy_data(work))
    cmd = [*TRAINER, *base(work), f"data.url={url}", "data.io_timeout=3"]
    started = exists(work / "run" / "checkpoints" / "step_00000000")
    threading.Thread(target=lambda: (_until(started), time.sleep(1), handler.hang.set()), daemon=True).start()
    return run_case(cmd, work, deadline=90)


def _until(condition, timeout=120):
    end = time.time() + timeout
    while not condition() and time.time() < end:
        time.sleep(0.2)


def case_during_evaluation_sigterm(work):
    toy_data(work)
    cmd = [*TRAINER, *tiny_overrides(work, 100_000), "eval.every=200", "eval.num_samples=3000000"]
    # The evaluation's log line appears after it: signal once the run has passed step 200's checkpoint.
    lines = work / "run" / "metrics.jsonl"

    def evaluating():
        return lines.exists() and '"step": 200' in lines.read_text()

    return run_case(cmd, work, ready=evaluating)


def case_guard_stop_exit(work):
    toy_data(work)
    cmd = [*TRAINER, *tiny_overrides(work, 100_000), "train.guard.max_abs_energy_gap=1e-9"]
    return run_case(cmd, work, deadline=120)


def case_rendezvous_sigterm(work):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env()
    env.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["ACCELERATE_USE_CPU"] = "1"
    t = time.time()
    return run_case([*TRAINER, *tiny_overrides(work)], work, env=env, ready=lambda: time.time() - t > 12)


def _two_ranks(work, act, extra=()):
    launcher, env = accelerate_launcher(2)
    toy_data(work)
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", *tiny_overrides(work, 100_000), *extra]
    started = exists(work / "run" / "checkpoints" / "step_00000000")

    def ready():
        if started():
            time.sleep(1)
            return True
        return False

    return run_case(cmd, work, env=env, ready=ready, act=act)


def _signal_rank(sig):
    def act(proc):
        os.kill(worker_pids(proc.pid)[1], sig)

    return act


def case_two_ranks_one_sigstopped(work):
    return _two_ranks(work, _signal_rank(signal.SIGSTOP), ["train.collective_timeout=15"])


def case_two_ranks_one_killed(work):
    return _two_ranks(work, _signal_rank(signal.SIGKILL))


def case_launcher_sigterm(work):
    return _two_ranks(work, lambda p: p.send_signal(signal.SIGTERM))


def case_launcher_sigusr1(work):
    return _two_ranks(work, lambda p: p.send_signal(signal.SIGUSR1))


def case_launcher_group_sigterm(work):  # what Slurm does: every process of the step
    return _two_ranks(work, lambda p: os.killpg(p.pid, signal.SIGTERM))


def case_launch_sh_nproc2_sigterm(work):
    toy_data(work)
    env = subprocess_env()
    env["MEG_VENV"] = str(Path(sys.executable).parent.parent)
    cmd = ["./launch.sh", "--nproc", "2", *tiny_overrides(work, 100_000)]
    started = exists(work / "run" / "checkpoints" / "step_00000000")
    return run_case(cmd, work, env=env, ready=started)


CASES = {name[5:]: f for name, f in sorted(globals().items()) if name.startswith("case_")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    results = {}
    for name, case in CASES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="meg-waits-") as d:
            started = time.time()
            results[name] = case(Path(d))
            results[name]["wall"] = round(time.time() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    hangs = sum(r["hang"] for r in results.values())
    tracebacks = sum(r["traceback"] for r in results.values())
    codes: dict[str, int] = {}
    for r in results.values():
        codes[str(r["exit"])] = codes.get(str(r["exit"]), 0) + 1
    slowest = max((r["seconds"] or 0 for r in results.values()), default=0)
    print(f"\n{len(results)} cases: {hangs} hangs, {tracebacks} with a traceback, exit codes {codes}, "
          f"slowest exit {slowest} s")  # fmt: skip


if __name__ == "__main__":
    main()
