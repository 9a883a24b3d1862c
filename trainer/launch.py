"""``accelerate launch`` with its rendezvous store listening on one address instead of all of them.

    python -m trainer.launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians

takes every argument of ``accelerate launch``. The store that torch's launcher starts on the main node
(the processes meet there; it has no authentication) listens on every network interface of the
machine; here it listens on the main process's address only: 127.0.0.1 on one node (the default
``--main_process_ip``), the head node's address on several. launch.sh and the Slurm scripts use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import api as elastic_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

PREEMPTED_EXIT_CODE = 75  # the trainer's requeue code (trainer/meg_trainer.py)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# How long torch's elastic agent waits for its workers after passing a stop signal on, before it kills
# them: a backstop. A worker that makes progress stops at its next metric reduction with a checkpoint,
# which may take minutes (a slow step, a large log.every), and one blocked in a wait ends itself
# MEG_STOP_GRACE_S after its last progress (trainer/main.py). A scheduler's deadline sets a shorter
# one: meg.sbatch derives it from its warning's lead time.
SHUTDOWN_SECONDS = "600"

_TCPStore = dist.TCPStore
_listening: list[socket.socket] = []  # the bound sockets live as long as the launcher
_exit_codes: list[int | None] = []  # the workers' exit codes, once the agent has closed them


def _store_on_its_own_address(host_name: str, port: int, *args, **kwargs):
    is_master = args[1] if len(args) > 1 else kwargs.get("is_master", False)
    if is_master and kwargs.get("master_listen_fd") is None:
        family, _, _, _, address = socket.getaddrinfo(host_name, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        _listening.append(sock)
        kwargs["master_listen_fd"] = sock.fileno()
    return _TCPStore(host_name, port, *args, **kwargs)


_close_handler = SubprocessHandler.close
_close_context = elastic_api.SubprocessContext._close


def _close_and_continue(self: SubprocessHandler, death_sig: signal.Signals | None = None) -> None:
    """The agent's signal to a worker, then SIGCONT: a stopped worker (SIGSTOP, a debugger) would
    otherwise keep the signal pending until the agent kills it."""
    _close_handler(self, death_sig)
    try:
        os.killpg(self.proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _close_and_record(self, death_sig: signal.Signals, timeout: int = 30) -> None:
    # A stop signal repeated while the agent waits for its workers (meg.sbatch repeats the warning
    # every 30 s) would raise out of the wait and end the agent, and with it the job step and the
    # workers before they save: it goes on to them instead.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _signal_children(signum))
    _close_context(self, death_sig, timeout)
    _exit_codes[:] = [h.proc.poll() for h in self.subprocess_handlers.values()]


_start_context = elastic_api.PContext.start


def _start_handling_sigusr1(self) -> None:
    # torch's launcher sets the signals its agent handles just before it starts the workers, without
    # SIGUSR1 (Slurm's warning before the time limit): added, the agent passes it on like SIGTERM.
    handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    if "SIGUSR1" not in handled.split(","):
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = handled + ",SIGUSR1"
    _start_context(self)


def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def _signal_children(signum: int) -> list[int]:
    """Sends ``signum`` to this process's children; returns their ids."""
    children = _children()
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return children


def _stopped_before_start(signum: int, frame) -> None:
    """Until the agent starts the workers (and puts in its own handlers) nothing runs to be stopped;
    a process started without the agent (one process, accelerate's simple launcher) gets the signal."""
    if not _signal_children(signum):
        print(f"launcher: stopped by signal {signum} before its processes started", file=sys.stderr, flush=True)
        os._exit(PREEMPTED_EXIT_CODE)


def _status(codes: list[int | None], fallback: int) -> int:
    """75 when every worker ended with it (or cleanly): a preempted job, to be requeued."""
    codes = [c for c in codes if c is not None]
    if codes and PREEMPTED_EXIT_CODE in codes and all(c in (0, PREEMPTED_EXIT_CODE) for c in codes):
        return PREEMPTED_EXIT_CODE
    return fallback


def main() -> None:
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_SECONDS)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stopped_before_start)
    from accelerate.commands.launch import main as accelerate_launch

    # Every place torch's launcher makes a store from: the static and the c10d rendezvous (accelerate
    # uses the latter when the port is taken), and the elastic utilities (through torch.distributed).
    for module in (static_tcp_rendezvous, c10d_rendezvous_backend, dist):
        module.TCPStore = _store_on_its_own_address
    SubprocessHandler.close = _close_and_continue
    elastic_api.SubprocessContext._close = _close_and_record
    elastic_api.PContext.start = _start_handling_sigusr1
    try:
        sys.exit(accelerate_launch())
    except SignalException as e:  # the agent passed the signal on to its workers and waited for them
        code = _status(_exit_codes, 128 + int(e.sigval))
        print(f"launcher: stopped by signal {int(e.sigval)}; its processes ended (exit {code})", file=sys.stderr)
        sys.exit(code)
    except subprocess.CalledProcessError as e:  # one process, without the agent: it said why
        sys.exit(e.returncode if e.returncode > 0 else 128 - e.returncode)
    except ChildFailedError as e:  # each rank printed its own error; no launcher traceback on top
        rank, first = e.get_first_failure()
        codes = [f.exitcode for f in e.failures.values()]
        code = _status(codes, first.exitcode if first.exitcode > 0 else 1)
        ended = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(e.failures.items()))
        what = "its processes were stopped to be requeued" if code == PREEMPTED_EXIT_CODE else "a process failed"
        print(f"launcher: {what} ({ended}; rank {rank} first); exit {code}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
