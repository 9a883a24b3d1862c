"""The share of a training step spent waiting for data, for the toy and 28x28 configs.

    python bench/bench_data_wait.py [--steps 60] [--workers 0 1 2] [--worker-types thread process]

Runs the real trainer (one process) for a few steps per case and reads ``data_wait_share`` (time
blocked on the next batch / wall time of the steps) from its metrics.jsonl. The 28x28 case uses
synthetic uint8 digit-sized shards, so it needs no download. Prints a table and appends JSON lines
to bench/results/data_wait.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from data_pipeline.cli import add_debug_flag, int_between, nonnegative_int, run_quietly, run_tool
from data_pipeline.shards import write_array_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_STEPS = 3  # log.every = steps // 3 must be >= 1


def cases(tmp: str) -> dict[str, list[str]]:
    """Each case's overrides of the toy_25gaussians preset (the data under ``tmp``)."""
    return {
        "toy": [f"data.url={os.path.join(tmp, 'toy')}", "data.toy_num_samples=65536"],
        "conv28": [
            f"data.url={os.path.join(tmp, 'digits')}",
            "data.toy=",
            "eval.kind=samples",  # the preset's toy evaluation scores 2-D points only
            "model.arch=conv",
            "model.z_dim=128",
            "data.batch_size=64",
            "train.energy_steps=5",
        ],
    }


def trainer_command(overrides: list[str], steps: int, workers: int, kind: str, out: str) -> list[str]:
    return [
        sys.executable,
        "trainer/main.py",
        "--config",
        "toy_25gaussians",
        *overrides,
        f"output_dir={out}",
        f"train.steps={steps}",
        f"data.num_workers={workers}",
        f"data.worker_type={kind}",
        f"log.every={steps // 3}",
        "eval.every=0",
        "eval.mala.steps=0",
        "eval.plots=false",
        "eval.num_samples=100",
        "log.prometheus_port=-1",
        "log.progress=false",
        "checkpoint.every=100000",
        "train.guard.max_rollbacks=0",
    ]


def run_case(name: str, overrides: list[str], steps: int, workers: int, kind: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"{name}-w{workers}-{kind}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_quietly(trainer_command(overrides, steps, workers, kind, out), f"the trainer on case {name}", cwd=ROOT, env=env)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"data_wait_share"' in line]
    steady = records[1:] or records  # the first interval includes starting the workers
    return {
        "case": name,
        "workers": workers,
        "worker_type": kind if workers else "-",
        "steps": steps,
        "data_wait_share": float(np.mean([r["data_wait_share"] for r in steady])),
        "step_time_ms": 1e3 * float(np.mean([r["step_time_s"] for r in steady])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int_between(MIN_STEPS, 10**7), default=60, help="toy steps (conv28: a sixth, at least 9)"
    )
    parser.add_argument("--workers", type=nonnegative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--worker-types", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_tool(lambda: bench(args), args.debug)


def bench(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        digits = rng.integers(0, 256, (4096, 1, 28, 28), dtype=np.uint8)
        write_array_shards(os.path.join(tmp, "digits"), "digits", "train", digits, np.zeros(4096, np.int64), 8)
        for name, overrides in cases(tmp).items():
            steps = args.steps if name == "toy" else max(args.steps // 6, 9)
            for workers in args.workers:
                for kind in args.worker_types[: 1 if workers == 0 else None]:  # 0 workers: no kind
                    rows.append(run_case(name, overrides, steps, workers, kind, tmp))
    print(f"{'case':8} {'workers':>7} {'type':>8} {'step ms':>9} {'data wait':>10}")
    for r in rows:
        print(
            f"{r['case']:8} {r['workers']:>7} {r['worker_type']:>8} {r['step_time_ms']:>9.1f} "
            f"{r['data_wait_share']:>9.1%}"
        )
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "data_wait.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "time": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
