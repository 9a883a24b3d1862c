"""``accelerate launch`` with its rendezvous store listening on one address instead of all of them.

    python -m trainer.launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians

takes every argument of ``accelerate launch``. The store that torch's launcher starts on the main node
(the processes meet there; it has no authentication) listens on every network interface of the
machine; here it listens on the main process's address only: 127.0.0.1 on one node (the default
``--main_process_ip``), the head node's address on several. launch.sh and the Slurm scripts use it.
"""

from __future__ import annotations

import socket
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

_TCPStore = dist.TCPStore
_listening: list[socket.socket] = []  # the bound sockets live as long as the launcher


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


def main() -> None:
    from accelerate.commands.launch import main as accelerate_launch

    # Every place torch's launcher makes a store from: the static and the c10d rendezvous (accelerate
    # uses the latter when the port is taken), and the elastic utilities (through torch.distributed).
    for module in (static_tcp_rendezvous, c10d_rendezvous_backend, dist):
        module.TCPStore = _store_on_its_own_address
    try:
        sys.exit(accelerate_launch())
    except SignalException as e:  # the agent ended its workers on SIGTERM; not a crash to trace back
        print(f"launcher: stopped by signal {int(e.sigval)}; its processes were ended", file=sys.stderr)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
