"""PacGAN's toy protocol as one command: N seeds of a preset, each final checkpoint scored on 2,500 samples.

    python bench/toy_protocol.py [--config toy_25gaussians] [--seeds 10] [--jobs 1] [--out DIR] [k=v ...]
    python bench/toy_protocol.py --collect DIR [DIR ...]      one table from finished protocol folders

Each seed is a separate trainer process (train.seed=S, output_dir=DIR/seed_S; the dotted overrides
pass through), at most --jobs at once; a seed's final checkpoint is then scored by the project's own
evaluate tool (trainer.evaluate, eval.num_samples=--samples). Per seed: modes with >= 1 and >= 20
high-quality samples, the high-quality share, PacGAN's reverse KL of the mode histogram, and the
energy as a density (NLL at T = the entropy weight, T = 1 and the validation-chosen T; the largest
over the smallest mode mass). Prints a markdown table of mean ± std over the seeds (std with
ddof=1) and writes DIR/rows.json (one row per seed), DIR/summary.json and DIR/table.md. A finished
seed is not trained again: rerunning the command resumes an interrupted protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from data_pipeline.cli import ConfigError, add_debug_flag, nonnegative_int, run_tool
from trainer import strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (key in the evaluation JSON, column heading, format of mean and std)
COLUMNS = [
    ("modes_hit", "modes ≥ 1", "{:.1f}"),
    ("modes_with_20", "modes ≥ 20", "{:.1f}"),
    ("high_quality_share", "high quality", "{:.1%}"),
    ("mode_kl_reverse", "reverse KL", "{:.4f}"),
    ("density_nll_tw", "NLL T=w", "{:.3f}"),
    ("density_nll_t1", "NLL T=1", "{:.3f}"),
    ("density_nll_best", "NLL best T", "{:.3f}"),
    ("density_best_t", "best T", "{:.3f}"),
    ("mode_mass_ratio", "mode mass ratio", "{:.3g}"),
]
REFERENCES = ("density_nll_true", "density_nll_uniform")
FIXED = ("train.seed", "output_dir")  # the tool sets these per seed


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value). NaN in any seed shows in the mean (an inf too, but
    the seeds' eval JSON, strict, holds it as null: read back as NaN)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2 or not math.isfinite(mean):
        return mean, 0.0 if n < 2 else math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(rows: list[dict]) -> dict[str, list[float]]:
    """{key: [mean, std]} over the seeds' rows, for every column and reference."""
    keys = [k for k, _, _ in COLUMNS] + [k for k in REFERENCES if all(k in r for r in rows)]
    return {k: list(mean_std([float(r[k]) for r in rows])) for k in keys if all(k in r for r in rows)}


def table(entries: list[tuple[str, int, dict[str, list[float]]]]) -> str:
    """A markdown table, one line per (label, number of seeds, summary)."""
    head = ["setting", "seeds"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, n, summary in entries:
        cells = [label, str(n)]
        for key, _, fmt in COLUMNS:
            if key not in summary:
                cells.append("–")
                continue
            mean, std = summary[key]
            cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if n > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/toy_protocol.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="toy_25gaussians", help="a toy preset with modes (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default: %(default)s)")
    parser.add_argument("--first-seed", type=nonnegative_int, default=0, help="the first seed (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="trainer processes at once (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=2500, help="generated samples per evaluation (PacGAN: 2500)")
    parser.add_argument("--out", help="the protocol's folder (default: runs/protocol/<preset>)")
    parser.add_argument("--label", help="the table's setting column (default: the overrides, or 'preset')")
    parser.add_argument("--collect", nargs="+", metavar="DIR", help="only print one table from finished folders")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="passed to every seed's trainer")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
    if args.collect is None:
        if args.seeds < 1 or args.jobs < 1 or args.samples < 1:
            parser.error("--seeds, --jobs and --samples must be >= 1")
        for item in args.overrides:
            if item.split("=", 1)[0].strip() in FIXED:
                parser.error(f"{item}: the tool sets {' and '.join(FIXED)} itself (use --first-seed, --out)")
    return args


def check_preset(args: argparse.Namespace) -> None:
    """Refuses, before any training, a preset or override that cannot work or that has no modes."""
    from trainer.config import load_config  # torch: imported once the arguments are known

    cfg = load_config(args.config, args.overrides)
    if cfg.eval.kind != "toy" or not cfg.data.toy:
        raise ConfigError(f"--config {args.config}: the protocol needs a toy preset (eval.kind=toy, data.toy set)")
    from data_pipeline.toy import TOY_SPECS

    if cfg.data.toy not in TOY_SPECS or TOY_SPECS[cfg.data.toy].centres is None:
        raise ConfigError(f"data.toy={cfg.data.toy} has no modes: PacGAN's protocol counts modes")


def run_seed_commands(args: argparse.Namespace, seed: int, folder: str) -> tuple[list[str], list[str]]:
    """The trainer's command and the evaluate tool's command for one seed."""
    train = [
        sys.executable,
        os.path.join(ROOT, "trainer", "main.py"),
        "--config",
        args.config,
        "log.progress=false",
        "log.prometheus_port=-1",
        *args.overrides,
        f"train.seed={seed}",
        f"output_dir={folder}",
    ]
    evaluate = [sys.executable, "-m", "trainer.evaluate", "--run", folder, f"eval.num_samples={args.samples}"]
    return train, evaluate


def protocol(args: argparse.Namespace) -> int:
    if args.collect:
        return collect(args.collect)
    check_preset(args)
    out = args.out or os.path.join("runs", "protocol", os.path.basename(args.config).removesuffix(".yaml"))
    os.makedirs(out, exist_ok=True)
    label = args.label or (" ".join(args.overrides) or "preset")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per trainer: --jobs of them side by side
    print(f"protocol {label}: {len(seeds)} seeds of {args.config}, {args.jobs} at a time, into {out}", flush=True)
    _prepare_data(args)
    pending, running, rows, failed = list(seeds), {}, {}, []
    start = time.monotonic()
    # After a failure no seed starts; the loop ends once the running ones have finished.
    while running or (pending and not failed):
        while pending and len(running) < args.jobs and not failed:
            seed = pending.pop(0)
            folder = os.path.join(out, f"seed_{seed}")
            os.makedirs(folder, exist_ok=True)
            log_path = os.path.join(folder, "protocol.log")
            train, evaluate = run_seed_commands(args, seed, folder)
            # One shell per seed: train, then score the final checkpoint; both write to the seed's log.
            script = f"{_quote(train)} && {_quote(evaluate)}"
            log_file = open(log_path, "a")
            proc = subprocess.Popen(["bash", "-c", script], stdout=log_file, stderr=subprocess.STDOUT, env=env)
            running[seed] = (proc, log_file, folder, time.monotonic())
            print(f"seed {seed}: started (log {log_path})", flush=True)
        time.sleep(1.0)
        for seed, (proc, log_file, folder, began) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[seed]
            if proc.returncode != 0:
                failed.append(seed)
                tail = open(os.path.join(folder, "protocol.log")).read()[-2000:]
                print(f"seed {seed}: FAILED (exit {proc.returncode}); the end of its log:\n{tail}", flush=True)
                continue
            rows[seed] = {**read_row(folder, seed), "num_samples": args.samples}
            r = rows[seed]
            done = len(rows) + len(failed)
            eta = (time.monotonic() - start) / done * (len(seeds) - done)
            print(
                f"seed {seed}: done in {time.monotonic() - began:.0f} s ({done}/{len(seeds)}, about {eta:.0f} s left): "
                f"{r['high_quality_share']:.1%} high quality, {r['modes_with_20']}/{r['num_modes']} modes with >= 20, "
                f"reverse KL {r['mode_kl_reverse']:.4f}, NLL best {r['density_nll_best']:.3f}",
                flush=True,
            )
    if failed:
        print(f"error: seeds {failed} failed (logs: {out}/seed_*/protocol.log); no table written", file=sys.stderr)
        return 1
    ordered = [rows[s] for s in seeds]
    summary = summarize(ordered)
    with open(os.path.join(out, "rows.json"), "w") as f:
        strict_json.dump(ordered, f, indent=1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        strict_json.dump(
            {"label": label, "config": args.config, "overrides": args.overrides, "seeds": seeds, **summary}, f
        )
    text = table([(label, len(ordered), summary)]) + "\n" + _references(summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n{text}\nwrote {out}/table.md, rows.json, summary.json ({time.monotonic() - start:.0f} s)", flush=True)
    return 0


def read_row(folder: str, seed: int) -> dict:
    """The evaluation JSON the evaluate tool wrote for the seed's final checkpoint, with seed and step."""
    from trainer.run_folder import resolve_checkpoint

    checkpoint = resolve_checkpoint(folder)
    path = os.path.join(folder, "eval", f"eval_{os.path.basename(checkpoint.rstrip('/'))}.json")
    with open(path) as f:
        results = strict_json.nan_for_null(json.load(f))
    missing = [k for k, _, _ in COLUMNS if k not in results]
    if missing:
        raise ConfigError(f"{path} lacks {missing}: eval.toy.density=false, or not a toy run with modes?")
    return {"seed": seed, "checkpoint": checkpoint, **results}


def collect(folders: list[str]) -> int:
    entries = []
    for folder in folders:
        try:
            with open(os.path.join(folder, "summary.json")) as f:
                summary = strict_json.nan_for_null(json.load(f))  # a NaN mean or std is written as null
        except FileNotFoundError:
            raise ConfigError(f"{folder} has no summary.json: not a finished protocol folder") from None
        entries.append((summary["label"], len(summary["seeds"]), summary))
    print(table(entries) + "\n" + _references(entries[0][2]))
    return 0


def _references(summary: dict) -> str:
    if "density_nll_true" not in summary:
        return ""
    return (
        f"\nreferences: NLL of the true density {summary['density_nll_true'][0]:.3f}, "
        f"uniform over the box {summary['density_nll_uniform'][0]:.3f}"
    )


def _prepare_data(args: argparse.Namespace) -> None:
    """Writes the preset's toy shards once, before seeds run side by side (each would write them);
    from seed 0, as the trainer's own first run would."""
    from data_pipeline import write_toy_data
    from trainer.config import load_config

    cfg = load_config(args.config, [*args.overrides, "train.seed=0"])
    write_toy_data(cfg.data, cfg.train.seed)


def _quote(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: protocol(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
