"""The gradient penalty's arithmetic: how many more multiply-adds an energy step does with it.

    python bench/penalty_flops.py                 # the paper's four networks (a few seconds each)
    python bench/penalty_flops.py --only toy --tiny

Counts the FLOPs of one energy step of bench/bench_penalty.py's rows (the trainer's own step code)
with PyTorch's flop formulas for every matrix product and convolution, forward and backward and the
penalty's double backward alike; element-wise work (activations, Adam) is left out. The ratio of
the step with the penalty to the step without it is the overhead a compute-bound step cannot go
under, whatever its kernels or capture; G's forward (the negatives), which both steps run, is
counted in the step and shown apart. A device is not needed: the count is the same on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_penalty import NETWORKS, ROWS, build_row, energy_step_fn, tiny_networks  # noqa: E402

from models.ops import TORCH_KERNELS, use_kernels  # noqa: E402
from trainer.runtime import DDPRuntime  # noqa: E402

COUNTED_ROWS = ("no penalty", "before issue 10", "+ inputs/fused Adam", "+ penalty kernel")


class FlopCount(TorchDispatchMode):
    """FLOPs of the matrix products and convolutions run inside it, and how many aten ops ran.
    (torch's FlopCounterMode tracks modules with hooks that autograd.grad(inputs=...) refuses.)"""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count(network: str, row_name: str, runtime: DDPRuntime) -> tuple[int, int]:
    """(energy step FLOPs, FLOPs of G's forward within it) for one row, after one uncounted step."""
    row = next(r for r in ROWS if r.name == row_name)
    cfg, shape, steps = build_row(network, row, runtime, "no")
    x = torch.randn(cfg.data.batch_size, *shape)
    step = energy_step_fn(row, steps)
    step(x, steps.sample_z())
    z = steps.sample_z()
    with FlopCount() as step_count:
        step(x, z)
    with FlopCount() as negatives_count, torch.no_grad():
        steps.negatives(z)
    return step_count.flops, negatives_count.flops


def measure(network: str, runtime: DDPRuntime) -> dict:
    flops = {name: count(network, name, runtime) for name in COUNTED_ROWS}
    floor, negatives = flops["no penalty"]
    out = {"network": network, "no_penalty_gflop": floor / 1e9, "negatives_gflop": negatives / 1e9}
    for name in COUNTED_ROWS[1:]:
        total = flops[name][0]
        out[name] = {"step": total / floor, "energy_only": (total - negatives) / (floor - negatives)}
    return out


def format_table(results: list[dict]) -> str:
    lines = [
        "FLOPs of one energy step (matrix products and convolutions), the penalty's step ÷ the step without it",
        "",
        "| network | no penalty (GFLOP) | of which G's forward | "
        + " | ".join(f"{name}: step (E's part)" for name in COUNTED_ROWS[1:])
        + " |",
        "|---|---|---|" + "---|" * (len(COUNTED_ROWS) - 1),
    ]
    for r in results:
        cells = [f"{r[name]['step']:.3f}× ({r[name]['energy_only']:.3f}×)" for name in COUNTED_ROWS[1:]]
        lines.append(
            f"| {r['network']} | {r['no_penalty_gflop']:.3f} | {r['negatives_gflop']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(NETWORKS), action="append", help="networks (default: all four)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and batches (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny:
        tiny_networks()
    runtime = DDPRuntime("no")
    # The fused ops' PyTorch references: the same products as their Triton kernels, countable here.
    with use_kernels(TORCH_KERNELS):
        results = [measure(network, runtime) for network in args.only or list(NETWORKS)]
    print(format_table(results))
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
