"""Scaling of one MEG step (energy + generator) across processes, engines and precisions, in one run.

    python bench/bench_scaling.py                    # toy preset networks, 256 samples per rank
    python bench/bench_scaling.py --steps 10 --hidden 32   # quick

Launches the real trainer step code: 1 process, then 2 processes (same per-rank batch) under DDP,
DeepSpeed ZeRO-1 and ZeRO-2, DDP in bf16, and FSDP2 (1 and 2 processes, fp32 and bf16). Memory per
rank (the largest over ranks): the parameters and the optimizer state each rank holds between steps
(their local tensors: a shard under FSDP2 and, for the optimizer, under ZeRO), and the process's peak
resident memory (ru_maxrss: everything, torch itself included). Prints one table of ratios and appends a JSON line to
bench/results/scaling.jsonl. Every process gets the same OMP_NUM_THREADS (--threads, default 1), so
that 2 processes use twice the cores of 1; with cores / processes threads a 1-process run on a busy
2-core machine oversubscribed and ran 10x slower, which made the ratio meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [  # name, processes, overrides
    ("ddp_1p_fp32", 1, []),
    ("ddp_2p_fp32", 2, []),
    ("zero1_2p_fp32", 2, ["train.engine=deepspeed", "deepspeed.zero_stage=1"]),
    ("zero2_2p_fp32", 2, ["train.engine=deepspeed", "deepspeed.zero_stage=2"]),
    ("ddp_2p_bf16", 2, ["train.mixed_precision=bf16"]),
    ("fsdp_1p_fp32", 1, ["train.engine=fsdp"]),
    ("fsdp_2p_fp32", 2, ["train.engine=fsdp"]),
    ("fsdp_2p_bf16", 2, ["train.engine=fsdp", "train.mixed_precision=bf16"]),
]


def worker(out: str, steps: int, overrides: list[str]) -> None:
    """One process of a case: times ``steps`` MEG steps after warm-up; rank 0 writes the result."""
    import torch

    from models.factory import build_networks
    from trainer.config import load_config
    from trainer.runtime import build_runtime
    from trainer.steps import build_steps

    cfg = load_config("toy_25gaussians", overrides)
    runtime = build_runtime(cfg)
    runtime.seed(0, per_rank=False)
    meg = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    x = torch.randn(meg.batch_per_rank, 2, device=runtime.device)

    def step():
        meg.energy_step(x, meg.sample_z())
        meg.generator_step(meg.sample_z())

    for _ in range(3):
        step()
    runtime.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    runtime.barrier()
    elapsed = time.perf_counter() - start
    held = runtime.all_gather(torch.tensor(held_bytes(meg), dtype=torch.float64)).max(0).values.tolist()
    if runtime.is_main:
        with open(out, "w") as f:
            json.dump(
                {
                    "step_s": elapsed / steps,
                    "samples_per_s": steps * cfg.data.batch_size / elapsed,
                    "world_size": runtime.world_size,
                    "threads": torch.get_num_threads(),
                    "param_mib_per_rank": held[0] / 2**20,
                    "optim_mib_per_rank": held[1] / 2**20,
                    "peak_rss_mib_per_rank": held[2] / 2**20,
                },
                f,
            )
    runtime.shutdown()


def held_bytes(meg) -> list[float]:
    """This rank's parameter bytes, optimizer-state bytes (local tensors) and peak resident bytes."""
    import resource

    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).nbytes for m in meg.modules() for p in m.parameters())
    optim = 0
    for update in (meg.energy_update, meg.generator_update):
        opt = getattr(update, "optimizer", None) or update.engine.optimizer
        opt = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps the torch one
        optim += sum(local(t).nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return [float(params), float(optim), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0]


def run_case(nproc: int, overrides: list[str], steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
        cmd = [sys.executable, __file__, "--worker", out, "--steps", str(steps), "--", *overrides]
        if nproc > 1:
            env["ACCELERATE_USE_CPU"] = env.get("ACCELERATE_USE_CPU", "1")
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                str(nproc),
                "--num_machines",
                "1",
                "--main_process_port",
                "0",
                *cmd[1:],
            ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="width of the 3 hidden layers of E, G and T")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.overrides)

    widths = f"[{args.hidden},{args.hidden},{args.hidden}]"
    rows = {}
    for name, nproc, extra in CASES:
        base = [
            f"model.hidden={widths}",
            f"model.generator_hidden={widths}",
            f"data.batch_size={args.batch_per_rank * nproc}",
        ]
        rows[name] = {"processes": nproc, **run_case(nproc, base + extra, args.steps, args.threads)}
        r = rows[name]
        print(
            f"{name:14} {nproc}p  {1e3 * r['step_s']:8.1f} ms/step  {r['samples_per_s']:9.0f} samples/s  "
            f"params {r['param_mib_per_rank']:6.2f} MiB  optim {r['optim_mib_per_rank']:6.2f} MiB  "
            f"peak RSS {r['peak_rss_mib_per_rank']:7.0f} MiB (per rank)",
            flush=True,
        )

    ratios = {
        "samples/s, 2 processes / 1 (same per-rank batch; ideal 2.0)": rows["ddp_2p_fp32"]["samples_per_s"]
        / rows["ddp_1p_fp32"]["samples_per_s"],
        "step time, ZeRO-1 / DDP (2 processes)": rows["zero1_2p_fp32"]["step_s"] / rows["ddp_2p_fp32"]["step_s"],
        "step time, ZeRO-2 / DDP (2 processes)": rows["zero2_2p_fp32"]["step_s"] / rows["ddp_2p_fp32"]["step_s"],
        "step time, bf16 / fp32 (DDP, 2 processes)": rows["ddp_2p_bf16"]["step_s"] / rows["ddp_2p_fp32"]["step_s"],
        "step time, FSDP2 / DDP (2 processes)": rows["fsdp_2p_fp32"]["step_s"] / rows["ddp_2p_fp32"]["step_s"],
        "parameter memory per rank, FSDP2 2 processes / 1 (ideal 0.5)": rows["fsdp_2p_fp32"]["param_mib_per_rank"]
        / rows["fsdp_1p_fp32"]["param_mib_per_rank"],
        "optimizer memory per rank, FSDP2 / DDP (2 processes)": rows["fsdp_2p_fp32"]["optim_mib_per_rank"]
        / rows["ddp_2p_fp32"]["optim_mib_per_rank"],
    }
    print(
        f"\ncpu cores={os.cpu_count()} threads/process={args.threads} hidden={widths} "
        f"batch/rank={args.batch_per_rank} steps={args.steps}"
    )
    print(f"{'ratio':62} {'value':>6}")
    for k, v in ratios.items():
        print(f"{k:62} {v:6.2f}")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "scaling.jsonl"), "a") as f:
        f.write(
            json.dumps(
                {
                    "rows": rows,
                    "ratios": ratios,
                    "hidden": args.hidden,
                    "batch_per_rank": args.batch_per_rank,
                    "steps": args.steps,
                    "threads": args.threads,
                    "cores": os.cpu_count(),
                    "host": platform.node(),
                    "time": time.time(),
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
