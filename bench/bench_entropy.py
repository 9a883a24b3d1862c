"""Compares the entropy estimators (train.entropy_estimator) on 25 Gaussians at the same compute.

    python bench/bench_entropy.py                          # 3 seeds x 6 estimators, 5,000 steps each
    python bench/bench_entropy.py --seeds 0 --steps 2000 --estimators jsd vera

Every run is the real trainer on the toy_25gaussians preset with only the estimator, the seed and
train.steps changed: the same networks, batch, energy steps and generator steps for each estimator.
Its final evaluation (2,500 samples) gives the sample metrics and the energy's density NLL. The cost
of a generator step (G and T, or VERA's posterior samples) and of a whole iteration (2 energy steps +
1 generator step) is timed in-process on the same networks, one thread, the estimators taking turns.
Appends one JSON line per run to bench/results/entropy.jsonl and prints a markdown table (mean ± std
over the seeds); ``--from-results`` prints it from that file without training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from data_pipeline.cli import add_debug_flag, nonnegative_int, positive_int, run_quietly, run_tool
from models.entropy import ESTIMATORS
from models.factory import build_networks
from trainer import strict_json
from trainer.config import load_config, vera_settings
from trainer.runtime import DDPRuntime
from trainer.steps import build_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULTS = os.path.join(REPO, "bench", "results", "entropy.jsonl")
KEYS = ("high_quality_share", "modes_with_20", "mode_kl_reverse", "density_nll_best", "density_nll_tw")


def step_costs(estimators: list[str], repeats: int, blocks: int = 5) -> dict[str, tuple[float, float]]:
    """Per estimator: (ms per generator step, ms per iteration) of the preset's networks, eager, one
    thread. The estimators take turns, block by block, and each keeps its median block: on a shared
    machine the load changes over a run, and timing one estimator after the other would measure that."""
    built = {}
    for estimator in estimators:
        cfg = load_config("toy_25gaussians", [f"train.entropy_estimator={estimator}"])
        torch.manual_seed(0)
        steps = build_steps(cfg, DDPRuntime("no"), build_networks(cfg.model, (2,), vera=vera_settings(cfg)))
        x = torch.randn(cfg.data.batch_size, 2)
        built[estimator] = (
            lambda steps=steps: steps.generator_step(steps.sample_z()),
            lambda steps=steps, x=x: steps.iteration(0, lambda: x),
        )
    samples: dict[str, list[tuple[float, float]]] = {e: [] for e in estimators}
    for _ in range(blocks):
        for estimator, fns in built.items():
            block = []
            for fn in fns:
                for _ in range(3):
                    fn()
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                block.append((time.perf_counter() - start) / repeats * 1e3)
            samples[estimator].append(tuple(block))
    return {e: tuple(statistics.median(b[i] for b in s) for i in range(2)) for e, s in samples.items()}


def train(estimator: str, seed: int, steps: int, out: str) -> dict:
    run = os.path.join(out, f"{estimator}_seed{seed}")
    cmd = [
        sys.executable, os.path.join(REPO, "trainer", "main.py"), "--config", "toy_25gaussians",
        f"output_dir={run}", f"train.entropy_estimator={estimator}", f"train.seed={seed}", f"train.steps={steps}",
        "eval.every=0", "eval.plots=false", "checkpoint.resume=false", "log.prometheus_port=-1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    start = time.perf_counter()
    run_quietly(cmd, f"the trainer on {estimator}, seed {seed}", cwd=REPO, env=env)
    wall = time.perf_counter() - start
    with open(os.path.join(run, "eval", "latest.json")) as f:
        evals = strict_json.nan_for_null(json.load(f))
    return {"wall_s": wall, **{k: evals[k] for k in KEYS}}


def _cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=5000, help="generator steps per run")
    parser.add_argument("--repeats", type=positive_int, default=50, help="timed calls per block of a step cost")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench_entropy"))
    parser.add_argument(
        "--from-results", action="store_true", help="no training: the table from bench/results/entropy.jsonl's runs"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.from_results and not os.path.isfile(RESULTS):
        parser.error(f"--from-results: there is no {RESULTS} yet (run the bench without --from-results first)")
    return run_tool(lambda: bench(args, RESULTS), args.debug)


def bench(args: argparse.Namespace, results: str) -> int:
    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(results), exist_ok=True)
    if not args.from_results:
        for estimator in args.estimators:
            for seed in args.seeds:
                record = {"estimator": estimator, "seed": seed, "steps": args.steps,
                          **train(estimator, seed, args.steps, args.out), "torch": torch.__version__}  # fmt: skip
                with open(results, "a") as f:
                    f.write(strict_json.dumps(record) + "\n")
                print(strict_json.dumps(record), file=sys.stderr, flush=True)
    runs: dict[tuple[str, int], dict] = {}
    with open(results) as f:
        for line in f:  # the newest record of each (estimator, seed) at these steps
            r = strict_json.nan_for_null(json.loads(line))
            if r["steps"] == args.steps and r["estimator"] in args.estimators and r["seed"] in args.seeds:
                runs[(r["estimator"], r["seed"])] = r
    costs = step_costs(args.estimators, args.repeats)
    seeds = sorted({seed for _, seed in runs})
    print(f"\n25 Gaussians, {args.steps} generator steps, seeds {' '.join(map(str, seeds))}:\n")
    print("| estimator | high-quality share | modes with ≥ 20 | reverse KL | density NLL (best T) | "
          "density NLL (T = w) | generator step, ms | iteration, ms | run, s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for estimator in args.estimators:
        done = [r for (e, _), r in sorted(runs.items()) if e == estimator]
        if not done:
            continue
        col = {k: [r[k] for r in done] for k in (*KEYS, "wall_s")}
        gen_ms, iter_ms = costs[estimator]
        print(
            f"| {estimator} | {_cell([100 * v for v in col['high_quality_share']], '.1f')}% "
            f"| {_cell(col['modes_with_20'], '.1f')} | {_cell(col['mode_kl_reverse'], '.3f')} "
            f"| {_cell(col['density_nll_best'], '.3f')} | {_cell(col['density_nll_tw'], '.2f')} "
            f"| {gen_ms:.1f} | {iter_ms:.1f} | {_cell(col['wall_s'], '.0f')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
