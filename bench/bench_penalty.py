"""What each piece of the fast energy step buys, on the paper's four energy networks, in one run.

    python bench/bench_penalty.py                       # CPU: 1 thread, every network and row
    python bench/bench_penalty.py --only toy --only kdd --repeats 20
    python bench/bench_penalty.py --precision bf16 --compile --out table.md   # on a GPU

Rows, each adding to the one above it (the real step code of trainer/steps.py, built the way the
trainer builds it, except where a row takes a piece away):
  before issue 10      E on cat(real, fake), gradient into the data batch too, unfused Adam (the old step)
  no penalty           "+ inputs/fused Adam" without the penalty: the eager floor
  eager penalty        E on real and fake separately; gradient into the data batch; unfused Adam
  + inputs/fused Adam  backward(inputs=E's parameters) and Adam(fused=True): model.kernels=eager
  + K1 bias_act        fused bias + LeakyReLU (Triton on CUDA; its PyTorch reference on a CPU)
  + K2 gradfix conv    native data/weight-gradient kernels at every derivative order
  + penalty kernel     the penalty's norm and mean in one kernel each way: model.kernels=fused
  + capture            the step replayed as a CUDA graph (train.capture=auto; CUDA only)
  no penalty + capture the captured step without the penalty: the captured floor
  lazy k=4, k=16       train.penalty_every=k with the device's defaults (auto kernels and capture):
                       the mean energy step over whole cycles of k (and iteration over whole cycles)
  compile (--compile)  torch.compile of loss and parameter gradients, trace_autograd_ops=True (eager kernels)

Columns: energy-step time (median of --repeats on a CPU; mean of CUDA events on a GPU), speed-up
against "eager penalty" and against "before", the most GPU memory the row's steps reserved beyond
its networks (Adam's state, the step's activations; a captured row's graph pools), the largest relative
gradient error of the row's step against an fp64 eager reference and the row's loss (same weights,
same batch: equal losses are the same numbers; a captured row's are its kernels' run eagerly, replay
against eager is tests/test_gpu.py's), and a full iteration's samples/s with the row's
kernels and capture (the preset's energy steps, with its penalty in every row, + one generator step;
a lazy row's over whole cycles of its penalty). Under the table, each network's penalty overhead: a
row ÷ the same row without the penalty, the pairs named there. Prints the table, appends JSON lines
to bench/results/penalty.jsonl, and writes the table to --out (markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

from data_pipeline.cli import UserError, check_output_file, positive_int
from models.factory import build_networks
from models.objectives import energy_loss
from models.ops import EAGER, FUSED, TORCH_KERNELS, FusedOps, use_kernels
from trainer.capture import WARMUP_CALLS
from trainer.config import load_config
from trainer.runtime import DDPRuntime, frozen
from trainer.steps import build_steps, resolve_kernels

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")

# name: (preset, sample shape, overrides) — the paper's networks at the paper's widths, batch sizes
# and energy steps per generator step.
NETWORKS = {
    "toy": ("toy_25gaussians", (2,), ["model.hidden=[512,512,512]", "model.generator_hidden=[512,512,512]"]),
    "kdd": ("kdd99", (118,), []),
    "stackedmnist": ("stackedmnist", (3, 28, 28), []),
    "cifar": ("cifar10", (3, 32, 32), ["train.mixed_precision=no"]),
}


@dataclass(frozen=True)
class Row:
    name: str
    ops: FusedOps | None = EAGER  # None: what model.kernels=auto picks on this device
    penalty: bool = True
    inputs_and_fused_adam: bool = True
    capture: str = "off"  # train.capture: auto captures on CUDA
    penalty_every: int = 1
    before: bool = False
    compile: bool = False


K1 = FusedOps(bias_act=True)
K12 = FusedOps(bias_act=True, gradfix_conv=True)
ROWS = [
    Row("before issue 10", inputs_and_fused_adam=False, before=True),
    Row("no penalty", penalty=False),
    Row("eager penalty", inputs_and_fused_adam=False),
    Row("+ inputs/fused Adam"),
    Row("+ K1 bias_act", ops=K1),
    Row("+ K2 gradfix conv", ops=K12),
    Row("+ penalty kernel", ops=FUSED),
    Row("+ capture", ops=FUSED, capture="auto"),
    # The captured floor: the penalty's overhead under capture is "+ capture" over this row.
    Row("no penalty + capture", ops=FUSED, penalty=False, capture="auto"),
    # The lazy rows run what a run on this device runs by default: auto kernels and capture.
    Row("lazy k=4", ops=None, capture="auto", penalty_every=4),
    Row("lazy k=16", ops=None, capture="auto", penalty_every=16),
]
COMPILE_ROW = Row("compile", compile=True)


# -- the step before this issue, kept here as the baseline --------------------------------------


def before_energy_loss(energy, x_real, x_fake, penalty_weight, scale=1.0):
    """The energy loss as it was: one forward over cat(real, fake), the penalty on the real half."""
    n = x_real.shape[0]
    x_real = x_real.detach().requires_grad_(True)
    energies = energy(torch.cat([x_real, x_fake.detach()])).float()
    e_real, e_fake = energies[:n], energies[n:]
    (grad,) = torch.autograd.grad(e_real.sum() * scale, x_real, create_graph=True)
    penalty = (grad.float() / scale).pow(2).flatten(1).sum(1).mean()
    return e_real.mean() - e_fake.mean() + penalty_weight * penalty


def unfused(steps) -> None:
    """Takes backward(inputs=...) and the fused Adam away from both updates (the rows that need it)."""
    for update in (steps.energy_update, steps.generator_update):
        groups = update.optimizer.param_groups
        update.optimizer = torch.optim.Adam(
            [p for g in groups for p in g["params"]], lr=float(groups[0]["lr"]), betas=groups[0]["betas"]
        )
        update.backward = lambda loss, u=update: u.scaler.scale(loss).backward()


def before_energy_step(steps, x_real: torch.Tensor, z: torch.Tensor) -> None:
    update = steps.energy_update
    with frozen(steps.generator, steps.statistics), steps.runtime.autocast():
        x_fake = steps.negatives(z)
        loss = before_energy_loss(update.nets["energy"], x_real, x_fake, steps.train_cfg.penalty_weight)
    update.zero_grad()
    update.backward(loss)
    update.step()


# -- building and timing ------------------------------------------------------------------------


def row_config(network: str, row: Row, precision: str):
    preset, shape, overrides = NETWORKS[network]
    extra = [
        f"train.mixed_precision={precision}",
        f"train.capture={row.capture}",
        f"train.penalty_every={row.penalty_every}",
    ]
    return load_config(preset, [*overrides, *extra]), shape


def row_ops(row: Row, cfg, runtime: DDPRuntime) -> FusedOps:
    return resolve_kernels(cfg, runtime) if row.ops is None else row.ops


def build_row(network: str, row: Row, runtime: DDPRuntime, precision: str):
    cfg, shape = row_config(network, row, precision)
    torch.manual_seed(0)
    ops = row_ops(row, cfg, runtime)
    steps = build_steps(cfg, runtime, build_networks(cfg.model, shape, ops), ops=ops)
    if not row.inputs_and_fused_adam:
        unfused(steps)
    return cfg, shape, steps


def compiled_energy_step(steps):
    """Loss and parameter gradients as one compiled region (the pattern that supports a double
    backward), the fused Adam step outside it."""
    torch._dynamo.config.trace_autograd_ops = True
    update = steps.energy_update
    energy = update.nets["energy"]
    params = list(energy.parameters())
    weight = steps.train_cfg.penalty_weight

    def loss_and_grads(x_real, x_fake):
        loss, _ = energy_loss(energy, x_real, x_fake, weight)
        return loss, torch.autograd.grad(loss, params)

    compiled = torch.compile(loss_and_grads)

    def step(x_real, z):
        with frozen(steps.generator, steps.statistics), steps.runtime.autocast():
            x_fake = steps.negatives(z)
            _, grads = compiled(x_real, x_fake)
        for p, g in zip(params, grads):
            p.grad = g
        update.optimizer.step()

    return step


def energy_step_fn(row: Row, steps):
    """One energy step of the row (a lazy row cycles through its k steps, one per call)."""
    if row.before:
        return lambda x, z: before_energy_step(steps, x, z)
    if row.compile:
        return compiled_energy_step(steps)
    counter = iter(range(10**9))
    return lambda x, z: steps.energy_step(x, z, row.penalty and steps.penalty_due(next(counter)))


def time_calls(fn, calls: int, device: torch.device) -> list[float]:
    """Seconds per call: each call on a CPU; the mean over CUDA events on a GPU (no per-call sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 / calls]
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_cycles(fn, cycle: int, done: int, calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, whose calls repeat every ``cycle`` calls and which has made ``done``
    calls: brought to the start of a cycle (a lazy row's penalty step), then timed over whole cycles,
    at least ``calls`` calls. The mean per call where a cycle's calls differ, else the median."""
    for _ in range(-done % cycle):
        fn()
    times = time_calls(fn, cycle * math.ceil(calls / cycle), device)
    return statistics.mean(times) if cycle > 1 else statistics.median(times)


def gradient_error(network: str, row: Row, runtime: DDPRuntime, precision: str) -> tuple[float, float]:
    """Largest relative error of the row's energy-loss gradients against fp64 eager ones, per tensor
    (|g - g64|max / |g64|max), with the same weights and batch (lazy rows: the weight k * lambda),
    and the row's loss on that batch."""
    cfg, shape = row_config(network, row, precision)
    torch.manual_seed(0)
    ops = row_ops(row, cfg, runtime)
    energy = build_networks(cfg.model, shape, ops).energy.to(runtime.device)
    reference = build_networks(cfg.model, shape, EAGER).energy
    reference.load_state_dict(energy.state_dict())
    reference = reference.to(runtime.device, torch.float64)
    # Real and fake from different distributions: with both N(0, 1) the two energy terms' gradients
    # cancel, and the relative error of what is left measures the cancellation, not the step.
    g = torch.Generator(device="cpu").manual_seed(1)
    x_real = (0.5 * torch.randn(cfg.data.batch_size, *shape, generator=g)).to(runtime.device)
    x_fake = (2 * torch.rand(cfg.data.batch_size, *shape, generator=g) - 1).to(runtime.device)
    weight = cfg.train.penalty_weight * row.penalty_every
    with runtime.autocast():
        if row.before:
            loss = before_energy_loss(energy, x_real, x_fake, weight)
        else:
            loss, _ = energy_loss(energy, x_real, x_fake, weight, penalty=row.penalty, fused_penalty=ops.penalty)
    grads = torch.autograd.grad(loss, list(energy.parameters()))
    ref_loss, _ = energy_loss(reference, x_real.double(), x_fake.double(), weight, penalty=row.penalty)
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    error = max(
        ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads, ref_grads)
    )
    return error, loss.item()


def measure(network: str, row: Row, runtime: DDPRuntime, precision: str, repeats: int, iterations: int) -> dict:
    device = runtime.device
    if row.capture == "auto" and row.ops is not None and device.type != "cuda":
        return {"skipped": "needs CUDA"}
    cfg, shape, steps = build_row(network, row, runtime, precision)
    batch = cfg.data.batch_size
    x = torch.randn(batch, *shape, device=device)
    step = energy_step_fn(row, steps)
    if device.type == "cuda":
        # From before the first step: a captured row's memory is its graphs' private pools, reserved
        # at capture (a replay allocates nothing); Adam's state appears at the first step in every row.
        torch.cuda.synchronize()
        gc.collect()  # the earlier rows' steps (reference cycles) and their graphs, before the baseline
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_reserved()
    # Warm-up: the capture's 3 eager steps and its capture (per graph: both of a lazy row's), the
    # compile, cuDNN's algorithm choice, the allocator's first blocks.
    k = row.penalty_every
    warmup = 2 + ((WARMUP_CALLS + 1) * k if steps.capture else 0) + (2 if row.compile else 0)
    for _ in range(warmup):
        step(x, steps.sample_z())
    out = {"energy_ms": 1e3 * time_cycles(lambda: step(x, steps.sample_z()), k, warmup, repeats, device)}
    if device.type == "cuda":
        out["reserved_mib"] = (torch.cuda.max_memory_reserved() - base) / 2**20
    if not row.before and not row.compile:
        n = cfg.train.energy_steps
        counter = iter(range(10**9))
        iteration = lambda: steps.iteration(next(counter), lambda: x)  # noqa: E731
        # Captured rows: the generator step's warm-up and capture (and the penalty step's, in a
        # "no penalty" row, whose iterations have the preset's penalty) before the clock starts.
        warmup = WARMUP_CALLS + 2 if steps.capture else 1
        for _ in range(warmup):
            iteration()
        # A lazy row's penalty falls on every k-th energy step: its iterations repeat every lcm(k, n) energy steps.
        cycle = math.lcm(k, n) // n
        per_iteration = time_cycles(iteration, cycle, warmup, iterations, device)
        out["iteration_samples_per_s"] = n * batch / per_iteration
    elif row.before:
        n = cfg.train.energy_steps

        def old_iteration():
            for _ in range(n):
                before_energy_step(steps, x, steps.sample_z())
            steps.generator_step(steps.sample_z())

        old_iteration()
        out["iteration_samples_per_s"] = n * batch / statistics.median(time_calls(old_iteration, iterations, device))
    out["grad_rel_error"], out["loss"] = gradient_error(network, row, runtime, precision)
    return out


def format_table(results: list[dict], device: torch.device, threads: int, precision: str) -> str:
    lines = [
        f"energy step: device={device} threads={threads} precision={precision} torch={torch.__version__}",
        "",
        "| network | row | energy ms | vs eager | vs before | reserved MiB | grad rel err | loss | iter samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_net: dict[str, dict[str, dict]] = {}
    for r in results:
        by_net.setdefault(r["network"], {})[r["row"]] = r
    for network, rows in by_net.items():
        eager = rows.get("eager penalty", {}).get("energy_ms")
        before = rows.get("before issue 10", {}).get("energy_ms")
        for name, r in rows.items():
            if "skipped" in r or "error" in r:
                lines.append(f"| {network} | {name} | {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            ms = r["energy_ms"]
            cells = [
                f"{ms:.2f}",
                f"{eager / ms:.2f}x" if eager else "",
                f"{before / ms:.2f}x" if before else "",
                f"{r['reserved_mib']:.0f}" if "reserved_mib" in r else "-",
                f"{r['grad_rel_error']:.1e}",
                f"{r['loss']:.6g}",
                f"{r['iteration_samples_per_s']:.0f}" if "iteration_samples_per_s" in r else "-",
            ]
            lines.append(f"| {network} | {name} | " + " | ".join(cells) + " |")
    overheads = [f"{network}: {text}" for network, rows in by_net.items() if (text := penalty_overheads(rows))]
    if overheads:
        pairs = "; ".join(f"{what}: {num} ÷ {den}" for what, num, den in OVERHEADS)
        lines += ["", f"penalty overhead, a row ÷ the same row without the penalty ({pairs}):", *overheads]
    return "\n".join(lines)


# (what it says, the step with the penalty, the same step without it): eager, captured, then the lazy
# rows (default kernels and capture) over the captured floor. "eager penalty" is no pair for "no
# penalty": it also takes backward(inputs=...) and the fused Adam away.
OVERHEADS = [
    ("eager", "+ inputs/fused Adam", "no penalty"),
    ("captured", "+ capture", "no penalty + capture"),
    ("lazy k=4", "lazy k=4", "no penalty + capture"),
    ("lazy k=16", "lazy k=16", "no penalty + capture"),
]


def penalty_overheads(rows: dict[str, dict]) -> str:
    """One network's overheads from the rows it has ("" when no pair was measured)."""
    ms = {name: r["energy_ms"] for name, r in rows.items() if "energy_ms" in r}
    return ", ".join(f"{what} {ms[num] / ms[den]:.2f}x" for what, num, den in OVERHEADS if num in ms and den in ms)


def root_cause(e: Exception) -> str:
    """One line for a table cell: the last "SomethingError: ..." line of the message (a compiler's
    subprocess error ends with advice, not the cause), with the kernel's name where it gives one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    names = [line for line in lines if line.startswith("Name=")]
    return "; ".join([*names[-1:], (causes or lines or [""])[-1]])


def tiny_networks() -> None:
    """NETWORKS at tiny widths and batches, each in its own architecture (a smoke run of every row)."""
    tiny = {"mlp": ["model.hidden=[8,8]", "model.generator_hidden=[8,8]"], "conv": ["model.conv_width=2"]}
    for name, (preset, shape, overrides) in list(NETWORKS.items()):
        arch = load_config(preset, overrides).model.arch
        NETWORKS[name] = (preset, shape, [*overrides, *tiny[arch], "data.batch_size=4"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(NETWORKS), action="append", help="networks (default: all four)")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed energy steps per row")
    parser.add_argument("--iterations", type=positive_int, default=2, help="timed full iterations per row")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads on a CPU (default 1)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and batches (a smoke run of every row)")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.out:
        try:
            check_output_file(args.out, "--out")
        except UserError as e:
            parser.error(str(e))
    torch.set_num_threads(args.threads)
    if args.tiny:
        tiny_networks()
    runtime = DDPRuntime(args.precision)
    rows = ROWS + ([COMPILE_ROW] if args.compile else [])
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        unknown = wanted - {r.name for r in rows}
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in wanted]
    # On a CPU the fused rows run the PyTorch reference kernels: Triton needs CUDA (or its interpreter).
    kernels = use_kernels(TORCH_KERNELS) if runtime.device.type != "cuda" else contextlib.nullcontext()
    results = []
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"device": str(runtime.device), "threads": torch.get_num_threads(), "precision": args.precision}
    with kernels:
        for network in args.only or list(NETWORKS):
            for row in rows:
                try:
                    r = measure(network, row, runtime, args.precision, args.repeats, args.iterations)
                except Exception as e:  # noqa: BLE001 - a row that fails is reported, the rest still run
                    traceback.print_exc()  # the whole error to the log; the table's cell gets its cause
                    r = {"error": f"failed: {type(e).__name__}: {root_cause(e)[:200]}".replace("|", "/")}
                results.append({"network": network, "row": row.name, **r})
                print(f"  {network:13} {row.name:20} {json.dumps(r)}", flush=True)
                # Row by row: a run stopped at its time limit (bench/gpu_check.sh) keeps what it measured.
                with open(os.path.join(RESULTS, "penalty.jsonl"), "a") as f:
                    f.write(json.dumps({**results[-1], **meta, "host": platform.node(), "time": time.time()}) + "\n")
                if args.out:
                    with open(args.out, "w") as f:
                        f.write(format_table(results, runtime.device, torch.get_num_threads(), args.precision) + "\n")
    print(format_table(results, runtime.device, torch.get_num_threads(), args.precision))
    runtime.shutdown()
    if uncompiled := [r["network"] for r in results if r["row"] == COMPILE_ROW.name and "error" in r]:
        print(f"torch.compile failed on {', '.join(uncompiled)} (its cell says why); the other rows decide the exit")
    return 1 if failed_rows(results) else 0


def failed_rows(results: list[dict]) -> list[str]:
    """The rows whose failure is this project's: torch.compile failing on a network (Inductor on the
    StackedMNIST net under Triton 3.6, an upstream compiler error) is that row's result, in its cell."""
    return [f"{r['network']} {r['row']}" for r in results if "error" in r and r["row"] != COMPILE_ROW.name]


if __name__ == "__main__":
    raise SystemExit(main())
