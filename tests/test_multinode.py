"""Two "nodes" on this machine: two `accelerate launch --num_machines 2 --machine_rank {0,1}`
processes meeting on 127.0.0.1 form one DDP group and train in sync.

Checked against one launch of the same two ranks on one machine: the parameters must match, and
be identical on both ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30

pytestmark = pytest.mark.slow

# Runs the trainer unchanged, then saves this rank's parameters of the three networks.
DUMP_PARAMS = """\
import os, sys, torch
sys.path.insert(0, {root!r})
from trainer import main as entry
from trainer.meg_trainer import MEGTrainer

train = MEGTrainer.train

def train_and_dump(self):
    out = train(self)
    nets = dict(zip(("energy", "generator", "statistics"), self.steps.modules()))
    params = {{f"{{n}}.{{k}}": v.detach().cpu() for n, m in nets.items() for k, v in m.state_dict().items()}}
    torch.save(params, os.path.join(self.cfg.output_dir, f"params_rank{{self.runtime.rank}}.pt"))
    return out

MEGTrainer.train = train_and_dump
sys.exit(entry.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, run: Path, data: Path, machine_rank: int | None, port: int) -> subprocess.Popen:
    """machine_rank None: both ranks on one machine; else this machine's one rank of two."""
    if machine_rank is None:
        topology = ["--num_machines", "1", "--num_processes", "2"]
    else:  # the multi-node template, as deploy/slurm/meg-node.sh uses it
        topology = ["--config_file", str(ROOT / "deploy" / "accelerate" / "multinode.yaml")]
        topology += ["--num_machines", "2", "--machine_rank", str(machine_rank)]
        topology += ["--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        *topology,
        "--main_process_port",
        str(port),
        str(script),
        "--config",
        "toy_25gaussians",
        *tiny_overrides(data.parent, STEPS),
        f"output_dir={run}",  # after the shared overrides: the later value wins
        f"data.url={data}",
        "checkpoint.every=1000",
        "log.progress=false",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    with open(run.parent / f"{run.name}-{machine_rank}.log", "w") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _run(tmp: Path, name: str, machine_ranks: list[int | None]) -> Path:
    script = tmp / "train_and_dump.py"
    script.write_text(DUMP_PARAMS.format(root=str(ROOT)))
    run = tmp / name
    run.mkdir()
    port = _free_port()
    procs = [_launch(script, run, tmp / "data", r, port) for r in machine_ranks]
    try:
        for p in procs:
            p.wait(240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp / f"{name}-{r}.log").read_text()[-3000:] for r in machine_ranks)
    assert all(p.returncode == 0 for p in procs), logs
    return run


def _params(run: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run / f"params_rank{rank}.pt")


def test_two_machines_on_loopback_train_in_sync(tmp_path):
    two_nodes = _run(tmp_path, "two_nodes", [0, 1])
    one_node = _run(tmp_path, "one_node", [None])

    p0, p1 = _params(two_nodes, 0), _params(two_nodes, 1)
    assert p0.keys() == p1.keys() and len(p0) >= 6
    for k in p0:  # DDP keeps the replicas bit-identical
        assert torch.equal(p0[k], p1[k]), k
    reference = _params(one_node, 0)
    for k in p0:  # the same two ranks, seeds and data split as on one machine
        torch.testing.assert_close(p0[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)

    # It trained, as one group of 2 (the log names the world size).
    log = (tmp_path / "two_nodes-0.log").read_text()
    assert "run toy_25gaussians: 2 process(es)" in log, log[-3000:]
    metrics = [json.loads(x) for x in (two_nodes / "metrics.jsonl").read_text().splitlines()]
    losses = [m["energy_loss"] for m in metrics if "energy_loss" in m]
    assert [m["step"] for m in metrics if "energy_loss" in m] == list(range(5, STEPS + 1, 5))
    ref_losses = [json.loads(x).get("energy_loss") for x in (one_node / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([x for x in ref_losses if x is not None], rel=1e-5, abs=1e-6)
    assert (two_nodes / "checkpoints" / f"step_{STEPS:08d}").is_dir()
