"""Trains an energy-based model with a Maximum Entropy Generator (MEG).

One process:                 python trainer/main.py --config toy_25gaussians train.steps=2000
Through accelerate:          accelerate launch trainer/main.py --config toy_25gaussians
Two CPU processes (one DDP group; plain --cpu starts only one process):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians
DeepSpeed ZeRO-2 on two processes (ZeRO 0/1/2; ZeRO-3 is refused: see trainer/runtime/deepspeed_engine.py):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians \\
        train.engine=deepspeed deepspeed.zero_stage=2 deepspeed.config_file=deploy/deepspeed/zero2.json
FSDP2, E, G and T sharded per layer (no or bf16 precision; see trainer/runtime/fsdp.py):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians \
        train.engine=fsdp
Mixed precision: train.mixed_precision=bf16 or fp16 (fp16: dynamic loss scaling, overflowing steps skipped).
Several nodes: see deploy/ (accelerate configs and SLURM scripts).

Overrides are dotted ``section.key=value`` pairs; ``--print-config`` shows every key. A run folder
holds config.yaml, metrics.jsonl, checkpoints/ and eval/; a restarted run resumes from its newest
intact checkpoint unless ``checkpoint.resume=false``. One trainer at a time may use a run folder.

Nothing in a preset, a saved config or a data file runs a program or loads code: ``pipe:`` URLs need
``--allow-pipe`` and a TorchScript ``eval.fid.inception`` needs ``--trust-inception``, both given here.
"""

# Only light imports up here: the signal handlers go in first thing in main(), and torch, accelerate
# and DeepSpeed (seconds to import) come after them, so that a stop request that arrives while the
# process starts still ends with a checkpoint and the requeue code.
from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from data_pipeline.cli import add_debug_flag, positive_int, run_tool

log = logging.getLogger("meg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a YAML preset: a path, or a name in configs/ (e.g. toy_25gaussians)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration and the files the run would need before starting, then exit "
        "(launch.sh runs it before a multi-process or Slurm launch)",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        metavar="N",
        help="with --check: check the job as N processes would run it (./launch.sh --nproc N passes it)",
    )
    parser.add_argument(
        "--allow-pipe", action="store_true", help="allow pipe: URLs (they run a shell command) in the data settings"
    )
    parser.add_argument(
        "--trust-inception", action="store_true", help="load eval.fid.inception (TorchScript runs code when loaded)"
    )
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")
    return parser


# A process blocked in a wait (a rendezvous, a collective) when a stop request comes cannot run Python:
# once it has made no progress for this long after the signal, the watchdog ends it, the newest
# checkpoint standing (within Slurm's 30 s between SIGTERM and SIGKILL). One that progresses is left
# to reach its next metric reduction and save: the scheduler's lead time (Slurm's --signal) covers that.
STOP_GRACE_SECONDS = float(os.environ.get("MEG_STOP_GRACE_S", "20"))
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: trainer/meg_trainer.py's, repeated here to stay light
# A user's Ctrl-C: the shells' 128 + SIGINT, not the requeue code (meg.sbatch requeues a job on 75).
INTERRUPTED_EXIT_CODE = 130


class StopRequest(threading.Event):
    """Set by a stop signal. ``progressed`` is the trainer's heartbeat (each batch a training step
    takes, each save begun): it tells the watchdog that the process still moves towards its stop
    checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.last_progress = time.monotonic()
        self.interrupted = False  # the first stop signal was a SIGINT (Ctrl-C): exit 130, not 75
        self._first = threading.RLock()  # the handler and the watchdog both see each signal

    def request(self, signum: int) -> None:
        with self._first:
            if not self.is_set():
                self.interrupted = signum == signal.SIGINT
                self.set()

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.interrupted else PREEMPTED_EXIT_CODE

    def progressed(self) -> None:
        self.last_progress = time.monotonic()


# A forked child (a DataLoader worker) inherits the wakeup fd: a Ctrl-C reaches the whole foreground
# process group, and each worker's SIGINT written to the parent's pipe read as one more Ctrl-C there.
_OWN_WAKEUP_FDS: set[int] = set()


def _leave_parents_wakeup_fd() -> None:
    with contextlib.suppress(ValueError):  # a fork from a thread other than the main one
        previous = signal.set_wakeup_fd(-1)
        if previous not in _OWN_WAKEUP_FDS:
            signal.set_wakeup_fd(previous)  # not this module's: left as it was


os.register_at_fork(after_in_child=_leave_parents_wakeup_fd)


@contextmanager
def stop_signals(grace: float = STOP_GRACE_SECONDS) -> Iterator[StopRequest]:
    """SIGUSR1 and SIGTERM (Slurm's warning before the time limit, a scheduler's preemption) set the
    event; the trainer checkpoints at its next metric reduction and the process exits with code 75.
    The previous handlers come back when the block ends.

    Python runs a handler only between bytecodes of the main thread, never while it is blocked in C
    (a rendezvous, a collective): the signal also reaches a watchdog thread through the wakeup fd,
    which sets the event itself and, once the process has made no progress (``StopRequest.progressed``)
    for ``grace`` seconds since the signal, flushes the output and exits with 75 (the newest
    checkpoint stands).

    SIGINT (Ctrl-C) is a stop request too, ending with 130: a second one exits at once, the newest
    checkpoint standing. A SIGINT the process was started ignoring (``nohup``, ``&`` in a script)
    stays ignored."""
    stop = StopRequest()
    signals = [signal.SIGUSR1, signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.request(signum)) for sig in signals}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _OWN_WAKEUP_FDS.add(write_fd)
    ended = threading.Event()
    threading.Thread(target=_watch, args=(read_fd, stop, ended, grace), name="stop-watchdog", daemon=True).start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_fd)  # before the watchdog closes its end
        _OWN_WAKEUP_FDS.discard(write_fd)
        ended.set()  # the caller exits (trainer/main.py at once) or goes on with other work
        os.close(write_fd)  # the watchdog's read ends
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(read_fd: int, stop: StopRequest, ended: threading.Event, grace: float) -> None:
    interrupts = 0

    def take(received: bytes) -> bool:
        """Whether ``received`` holds a stop signal; a second SIGINT ends the process here."""
        nonlocal interrupts
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                stop.request(signum)
        if signal.SIGINT in received:
            interrupts += received.count(signal.SIGINT)
            if interrupts >= 2:
                exit_now(INTERRUPTED_EXIT_CODE, "interrupted again: exiting at once, the newest checkpoint stands")
            print(
                "interrupted: stopping at the next metric reduction with a checkpoint (Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )
        return any(sig in received for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT))

    try:
        while True:
            received = os.read(read_fd, 64)
            if not received:
                return  # the block ended
            if take(received):
                break
        signalled = time.monotonic()
        while True:  # the grace runs from the signal or from the newest progress, whichever came later
            if ended.is_set():
                return
            left = max(signalled, stop.last_progress) + grace - time.monotonic()
            if left <= 0:
                break
            # Reading on, so that a second Ctrl-C still ends the process.
            if select.select([read_fd], [], [], min(left, 0.2))[0]:
                received = os.read(read_fd, 64)
                if not received:
                    return  # the block ended
                take(received)
        reason = "interrupted" if stop.interrupted else "preempted"
        exit_now(
            stop.exit_code,
            f"{reason}: the process did not end within {grace:g} s of the stop signal or of its last progress "
            "(blocked in a wait); exiting, the newest checkpoint stands",
        )
    finally:
        # Open until the block ends: a repeated signal (meg.sbatch repeats its warning, the launcher
        # passes each on) is written to the wakeup fd, and a closed reader made Python print a
        # BrokenPipeError traceback for each.
        os.close(read_fd)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), read from /proc ([] without it)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat") as f:  # "pid (name) state ppid ...": the name may hold spaces
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # not a process, or one that just ended
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, below = [], [pid]
    while below:
        for child in children.get(below.pop(), []):
            found.append(child)
            below.append(child)
    return found


def exit_now(code: int, message: str = "") -> None:
    """Ends the process at once: the output flushed, every process it started killed (DataLoader workers,
    a pipe: shard's command and what that runs), and no wait for threads still blocked in a read (an
    interpreter exit may wait on them, or on their locks)."""
    if message:
        print(message, file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    if code in (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE) and "trainer.prometheus" in sys.modules:
        sys.modules["trainer.prometheus"].withdraw_target_files()  # stopped on request: not down for the alerts
    # All of them found before any is killed: a killed shell's own children would be orphaned, out of reach.
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for child in multiprocessing.active_children():  # where there is no /proc
        with contextlib.suppress(Exception):
            child.kill()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    with stop_signals() as stop:  # first: from here on a stop request ends with the requeue code
        parser = build_parser()
        args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
        if args.processes and not args.check:
            parser.error("--processes goes with --check; to train in N processes: ./launch.sh --nproc N")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every save
        if args.print_config:  # the configuration alone: its loader imports no torch, and nothing of a job
            return run_tool(lambda: _print_config(args), args.debug)
        if args.check:  # no job: nothing of its (torch-importing) error types is needed
            return run_tool(lambda: _check(args), args.debug)
        return run_tool(lambda: _main(args, stop), args.debug, extra=_job_errors())


def _job_errors() -> tuple[type[BaseException], ...]:
    from trainer.checkpoint import CheckpointError
    from trainer.guard import Diverged
    from trainer.nofollow import LinkedRunFolder
    from trainer.run_folder import RunFolderBusy
    from trainer.runtime import CollectiveError, LaunchError

    return (LaunchError, Diverged, RunFolderBusy, CollectiveError, CheckpointError, LinkedRunFolder)


def _print_config(args: argparse.Namespace) -> int:
    from trainer.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, args.overrides), choices=True), end="")
    return 0


def check_job(args: argparse.Namespace):
    """The run's configuration (a RunConfig), with everything checked that can be before any work: the data
    URL's scheme, the run folder (and that its newest checkpoint resumes into these settings), commands in
    the config, the launcher's precision, the evaluation's files, the trackers. (Not the data itself: a
    Slurm job's data may be on its nodes' storage only.)"""
    from data_pipeline.config import check_url
    from trainer.config import ConfigError, check_commands, check_launcher_precision, load_config
    from trainer.evaluation import check_requirements
    from trainer.job import check_batch_split, check_output_dir, check_resume_settings
    from trainer.nofollow import check_run_folder
    from trainer.trackers import check_trackers

    cfg = load_config(args.config, args.overrides)
    url_problem = check_url(cfg.data.url)
    if url_problem:
        raise ConfigError(f"data.url={cfg.data.url!r}: {url_problem}")
    check_output_dir(cfg.output_dir, cfg.data.url)
    check_run_folder(cfg.output_dir)  # links where the run writes
    if args.processes:
        check_batch_split(cfg, args.processes)
    check_resume_settings(cfg, args.processes or None)  # the run folder's newest checkpoint takes these settings
    check_commands(cfg, allow_pipe=args.allow_pipe, trust_inception=args.trust_inception)
    check_launcher_precision(cfg)
    check_requirements(cfg)  # every file the evaluation reads, before any work
    check_trackers(cfg.log.trackers)
    return cfg


def _check(args: argparse.Namespace) -> int:
    check_job(args)
    print(f"{args.config or 'the defaults'}: the configuration and the files it names are good", flush=True)
    return 0


def _main(args: argparse.Namespace, stop: StopRequest) -> int:
    cfg = check_job(args)
    from trainer.job import run
    from trainer.meg_trainer import Preempted

    try:
        run(cfg, stop, preset=args.config or "", heartbeat=stop.progressed)
    except Preempted as e:
        print(f"{'interrupted' if stop.interrupted else 'preempted'}: {e}", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except Exception:
        # A bug's traceback, as the interpreter prints it, and its status 1; then the same exit as any failure:
        # a rank that failed alone left its process group without meeting the others (trainer/job.py), and
        # the interpreter's exit would tear it down while they still talk to it (or wait on its threads).
        traceback.print_exc()
        exit_now(1)
    if status != 0:
        # Stopped, failed or preempted: nothing is left to do, and reader threads blocked in storage,
        # or a process group another rank left, must not hold the exit up.
        exit_now(status)
    sys.exit(status)
