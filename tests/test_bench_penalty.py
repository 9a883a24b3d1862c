"""bench/bench_penalty.py: a lazy row is timed over whole cycles of its penalty, and each penalty overhead
divides a row by the same row without the penalty."""

import dataclasses
import importlib.util
import math
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from trainer.runtime import DDPRuntime

_spec = importlib.util.spec_from_file_location("bench_penalty", REPO_ROOT / "bench" / "bench_penalty.py")
bench_penalty = importlib.util.module_from_spec(_spec)
sys.modules["bench_penalty"] = bench_penalty  # its dataclass looks its module up there
_spec.loader.exec_module(bench_penalty)
ROWS = {r.name: r for r in bench_penalty.ROWS}


@pytest.fixture
def runtime():
    runtime = DDPRuntime("no")
    yield runtime
    runtime.shutdown()


@pytest.mark.parametrize("network, row, energy_steps", [("toy", "lazy k=16", 2), ("kdd", "lazy k=4", 1)])
def test_a_lazy_row_is_timed_over_whole_cycles_from_a_penalty_step(monkeypatch, runtime, network, row, energy_steps):
    monkeypatch.setattr(bench_penalty, "NETWORKS", dict(bench_penalty.NETWORKS))
    bench_penalty.tiny_networks()
    regions: list[list[bool]] = []  # per timed region: whether each of its energy steps computed the penalty
    timing = []
    time_calls, build_steps = bench_penalty.time_calls, bench_penalty.build_steps

    def timed(fn, calls, device):
        regions.append([])
        timing.append(True)
        try:
            return time_calls(fn, calls, device)
        finally:
            timing.pop()

    def counted_steps(*args, **kwargs):
        steps = build_steps(*args, **kwargs)
        energy_step = steps.energy_step

        def counted(x_real, z, penalty=True):
            if timing:
                regions[-1].append(penalty)
            return energy_step(x_real, z, penalty)

        steps.energy_step = counted  # what the row's energy steps and steps.iteration call
        return steps

    monkeypatch.setattr(bench_penalty, "time_calls", timed)
    monkeypatch.setattr(bench_penalty, "build_steps", counted_steps)
    k = ROWS[row].penalty_every
    with bench_penalty.use_kernels(bench_penalty.TORCH_KERNELS):
        out = bench_penalty.measure(network, ROWS[row], runtime, "no", repeats=2, iterations=2)
    assert "iteration_samples_per_s" in out
    energy, iterations = regions
    # Energy steps: one cycle of k, its penalty step first.
    assert energy[0] and len(energy) == k and sum(energy) == 1
    # Iterations: whole cycles of lcm(k, energy steps) energy steps, one penalty step in each of k.
    cycle = math.lcm(k, energy_steps)
    assert iterations[0] and len(iterations) % cycle == 0 and sum(iterations) == len(iterations) // k


def test_each_overhead_divides_a_row_by_the_same_row_without_the_penalty():
    for what, with_penalty, without in bench_penalty.OVERHEADS:
        a, b = ROWS[with_penalty], ROWS[without]
        assert a.penalty and not b.penalty
        differ = {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
        # Lazy rows run auto kernels (fused where captured, as the captured floor's row is) every k-th step.
        assert differ == (
            {"name", "penalty", "penalty_every", "ops"} if what.startswith("lazy") else {"name", "penalty"}
        )


def test_the_table_says_which_rows_each_overhead_divides():
    ms = {"before issue 10": 8.0, "no penalty": 2.0, "eager penalty": 4.0, "+ inputs/fused Adam": 3.0}
    results = [
        {"network": "toy", "row": name, "energy_ms": v, "grad_rel_error": 0.0, "loss": 0.0} for name, v in ms.items()
    ]
    table = bench_penalty.format_table(results, torch.device("cpu"), 1, "no")
    assert "eager: + inputs/fused Adam ÷ no penalty" in table
    assert table.splitlines()[-1] == "toy: eager 1.50x"
