"""Times one energy step and one generator + statistics step of the real trainer code.

    python bench/bench_steps.py                 # toy MLP, 28x28x1 and 32x32x3 convs
    python bench/bench_steps.py --repeats 20 --only toy

Prints a table (ms/step and samples/s) and appends one JSON line per row to bench/results/steps.jsonl.
The energy step includes the gradient penalty's double backward. The steps are built as the trainer
builds them (model.kernels and train.capture auto: fused and captured on CUDA, eager on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from data_pipeline.cli import positive_int
from models.factory import build_networks
from trainer.capture import WARMUP_CALLS
from trainer.config import load_config
from trainer.runtime import DDPRuntime
from trainer.steps import build_steps, resolve_kernels

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results", "steps.jsonl")
CONV = ["model.arch=conv", "model.z_dim=128", "data.batch_size=64"]
CASES = {
    "toy": ("toy_25gaussians", (2,), ["data.batch_size=256"]),
    "conv28": ("toy_25gaussians", (1, 28, 28), CONV),
    "conv32": ("toy_25gaussians", (3, 32, 32), CONV),
    # StackedMNIST's conv nets at the paper's width and at a quarter of it (model.conv_width=16).
    "conv28x3": ("toy_25gaussians", (3, 28, 28), CONV),
    "conv28x3_w16": ("toy_25gaussians", (3, 28, 28), [*CONV, "model.conv_width=16"]),
}


def _time(fn, repeats: int, device: torch.device) -> float:
    for _ in range(WARMUP_CALLS + 2):  # past a captured step's eager warm-up and its capture
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args(argv)
    runtime = DDPRuntime(args.mixed_precision)
    rows = []
    for name in args.only or list(CASES):
        preset, shape, overrides = CASES[name]
        cfg = load_config(preset, overrides)
        nets = build_networks(cfg.model, shape, resolve_kernels(cfg, runtime))
        steps = build_steps(cfg, runtime, nets)
        batch = cfg.data.batch_size
        x = torch.randn(batch, *shape, device=runtime.device)
        e = _time(lambda s=steps, x=x: s.energy_step(x, s.sample_z()), args.repeats, runtime.device)
        g = _time(lambda s=steps: s.generator_step(s.sample_z()), args.repeats, runtime.device)
        rows.append(
            {
                "case": name,
                "batch": batch,
                "energy_ms": 1e3 * e,
                "generator_ms": 1e3 * g,
                "energy_samples_per_s": batch / e,
                "generator_samples_per_s": batch / g,
            }
        )
    print(f"device={runtime.device} threads={torch.get_num_threads()} precision={args.mixed_precision}")
    print(
        f"{'case':14} {'batch':>5} {'energy ms':>10} {'gen ms':>10} {'energy samp/s':>14} {'gen samp/s':>11} {'E/G':>5}"
    )
    for r in rows:
        print(
            f"{r['case']:14} {r['batch']:>5} {r['energy_ms']:>10.1f} {r['generator_ms']:>10.1f} "
            f"{r['energy_samples_per_s']:>14.0f} {r['generator_samples_per_s']:>11.0f} "
            f"{r['energy_ms'] / r['generator_ms']:>5.2f}"
        )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {
                        **r,
                        "device": str(runtime.device),
                        "threads": torch.get_num_threads(),
                        "precision": args.mixed_precision,
                        "host": platform.node(),
                        "time": time.time(),
                    }
                )
                + "\n"
            )
    runtime.shutdown()


if __name__ == "__main__":
    main()
