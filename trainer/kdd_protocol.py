"""KDD Cup 99 by the paper's protocol: ``eval.kdd.splits`` random 50/50 splits (split S: data seed S,
train.seed S), each scored by the mean of its evaluations at the ends of its last ``eval.kdd.last_epochs``
epochs; the table is mean ± std (numpy's, ddof=0) over the splits of those per-split means.

    python -m trainer.kdd_protocol --csv ../shared/data/kddcup99/kddcup.data_10_percent.gz --out runs/kdd_paper \\
        [--config kdd99] [--splits 5] [section.key=value ...]

Split S: its data in OUT/data/split_S (``convert kdd --seed S``, written once), its run in OUT/split_S,
trained by trainer/main.py in a process of its own with ``eval.kdd.protocol=paper eval.every=0`` (a
finished split resumes, finds nothing to do and is only read). OUT/protocol_inputs.json records the CSV
(its sha256) and the settings OUT is made with: a rerun with another CSV or other settings (but for the
number of splits) is refused, since it would reuse those splits. Writes OUT/protocol.json and a table.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys

from data_pipeline.cli import EXIT_USER_ERROR, ConfigError, add_debug_flag, positive_int, run_tool
from trainer import strict_json
from trainer.evaluation.anomaly import mean_std
from trainer.nofollow import write_replacing

SHOWN = ("f1", "precision", "recall", "auroc", "auprc")


def epoch_evaluations(run_dir: str) -> list[dict]:
    """The run's evaluation records (eval/step_*.json) in step order."""
    records = []
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "step_*.json"))):
        with open(path) as f:
            records.append(strict_json.nan_for_null(json.load(f)))
    return sorted(records, key=lambda r: r["step"])


def split_summary(records: list[dict], last_epochs: int) -> dict[str, float]:
    """The mean of each metric over the last ``last_epochs`` evaluations (refused when fewer)."""
    if len(records) < last_epochs:
        steps = [r["step"] for r in records]
        raise ConfigError(
            f"{len(records)} epoch evaluations (steps {steps}), the protocol averages {last_epochs}: train.steps "
            "must cover eval.kdd.last_epochs epochs (or set eval.kdd.epoch_steps)"
        )
    return {k: v["mean"] for k, v in mean_std(records[-last_epochs:]).items() if k != "step"}


def aggregate(per_split: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± std over the splits of their epoch means."""
    return mean_std(per_split)


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = ["score     | " + " | ".join(f"{m:>15}" for m in SHOWN)]
    for score in ("energy", "grad_norm"):
        cells = [summary.get(f"{score}_{m}") for m in SHOWN]
        lines.append(
            f"{score:<9} | " + " | ".join(f"{c['mean']:.4f} ± {c['std']:.4f}" if c else f"{'-':>15}" for c in cells)
        )
    return "\n".join(lines)


# What the protocol sets for each split's run (an override of these was silently dropped), and to what.
PROTOCOL_KEYS = {
    "data.url": "OUT/data/split_N/train",
    "eval.kdd.test_data": "OUT/data/split_N/test",
    "output_dir": "OUT/split_N",
    "train.seed": "N",
    "eval.kdd.protocol": "paper",
    "eval.every": "0",
}


def check_protocol_settings(cfg, config: str, overrides: list[str]) -> None:
    """Raises ConfigError for a preset that is not a KDD evaluation, or an override of what the protocol
    sets per split: before the first split's data is written."""
    if cfg.eval.kind != "kdd":
        raise ConfigError(
            f"--config {config} evaluates eval.kind={cfg.eval.kind}; the KDD protocol trains on KDD Cup 99 and "
            "scores eval.kind=kdd: use --config kdd99 (the default) or a preset of your own with eval.kind=kdd"
        )
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in PROTOCOL_KEYS:
            raise ConfigError(
                f"{override}: the protocol sets {key}={PROTOCOL_KEYS[key]} for each split N (OUT: --out); drop it"
            )


INPUTS_NAME = "protocol_inputs.json"
# What in a split's run folder means it has trained (the trainer's own test for an earlier run there).
TRAINED_NAMES = ("checkpoints", "eval", "metrics.jsonl")


def file_sha256(url: str) -> str:
    """The sha256 of the file's bytes as stored (compressed or not): its data sets' ``source_checksum``."""
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise ConfigError(f"--csv {url}: no such file (kddcup.data_10_percent.gz or the full file)") from None
    return digest.hexdigest()


def protocol_inputs(cfg, config: str, overrides: list[str], csv: str) -> dict:
    """What OUT's splits are made from: the CSV and every setting of the runs (the number of splits aside:
    split S is the same whatever their number)."""
    import yaml

    from trainer.config import config_to_yaml

    settings = yaml.safe_load(config_to_yaml(cfg))
    del settings["eval"]["kdd"]["splits"]
    return {
        "csv": {"path": csv if "://" in csv else os.path.abspath(csv), "sha256": file_sha256(csv)},
        "config": config,
        "overrides": overrides,
        "settings": settings,
    }


def check_inputs_match(out: str, inputs: dict) -> None:
    """Raises ConfigError when OUT holds split data made from another CSV, or split runs trained with other
    settings, than ``inputs``: a rerun reuses the data and resumes the runs (a finished one is only read),
    so it would report their numbers under its own. Until a split has trained the settings are free to
    change (a run that refused its settings is fixed and rerun), and the CSV until split data is written."""
    from trainer.config import leaves

    data_made = bool(glob.glob(os.path.join(glob.escape(out), "data", "split_*")))
    trained = any(
        os.path.lexists(os.path.join(run_dir, name))
        for run_dir in glob.glob(os.path.join(glob.escape(out), "split_*"))
        for name in TRAINED_NAMES
    )
    if not data_made and not trained:
        return
    path = os.path.join(out, INPUTS_NAME)
    if not os.path.isfile(path):
        # A protocol begun before the inputs were recorded: its CSV and settings cannot be checked, and
        # each split's config.yaml is no witness (a rerun that trains nothing rewrites it with its own).
        raise ConfigError(
            f"--out {out} holds splits made before the protocol recorded its CSV and settings ({INPUTS_NAME}), "
            f"so a rerun cannot tell whether they match: give a new --out, or move {out} aside to start over"
        )
    try:
        with open(path) as f:
            recorded = json.load(f)
        recorded_csv, recorded_settings = recorded["csv"], recorded["settings"]
        if not isinstance(recorded_settings, dict) or not isinstance(recorded_csv, dict):
            raise TypeError("its csv and settings must be objects")
        made_with = shlex.join(["--csv", recorded_csv["path"], "--config", recorded["config"], *recorded["overrides"]])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} is damaged ({type(e).__name__}: {e}): its splits cannot be checked against this rerun; give a "
            f"new --out, or move {out} aside to start over"
        ) from None
    differences = []
    if recorded_csv.get("sha256") != inputs["csv"]["sha256"]:
        differences.append(
            f"--csv {inputs['csv']['path']} is not the file its splits were made from ({recorded_csv['path']}, "
            f"sha256 {str(recorded_csv.get('sha256'))[:12]}...)"
        )
    if trained:
        # Values as JSON, so that they compare as they are recorded.
        was, now = ({k: json.dumps(v) for k, v in leaves(tree)} for tree in (recorded_settings, inputs["settings"]))
        for key in [*now, *(k for k in was if k not in now)]:
            if was.get(key) != now.get(key):
                differences.append(f"{key} was {was.get(key, 'unset')}, now {now.get(key, 'unset')}")
    if differences:
        raise ConfigError(
            f"--out {out} was made with other inputs: {'; '.join(differences)}. To resume or reread it, rerun with "
            f"{made_with}; for these, give a new --out (or move {out} aside)"
        )


def _child_env() -> dict[str, str]:
    """This checkout first on the trainer's import path, wherever the tool is run from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.kdd_protocol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", required=True, help="kddcup.data_10_percent(.gz) or the full file")
    parser.add_argument("--out", required=True, help="folder for the splits' data, runs and protocol.json")
    parser.add_argument("--config", default="kdd99", help="the preset the runs start from")
    parser.add_argument(
        "--splits", type=positive_int, help="how many random splits (default: the preset's eval.kdd.splits)"
    )
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every split's run")
    args = parser.parse_intermixed_args(argv)
    return run_tool(lambda: _protocol(args), args.debug)


def _protocol(args: argparse.Namespace) -> int:
    from data_pipeline.convert import convert_kdd
    from trainer.config import load_config
    from trainer.trackers import check_trackers

    cfg = load_config(args.config, [*args.overrides, "eval.kdd.protocol=paper"])
    # What would stop the first split's run, said before its data is written.
    check_protocol_settings(cfg, args.config, args.overrides)
    check_trackers(cfg.log.trackers)
    if "://" not in args.csv and not os.path.isfile(args.csv):
        raise ConfigError(f"--csv {args.csv} is not a file (kddcup.data_10_percent.gz or the full file)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file: give a folder for the splits' data and runs")
    inputs = protocol_inputs(cfg, args.config, args.overrides, args.csv)
    check_inputs_match(args.out, inputs)
    os.makedirs(args.out, exist_ok=True)
    with write_replacing(os.path.join(args.out, INPUTS_NAME)) as f:
        strict_json.dump(inputs, f, indent=2)
    splits = cfg.eval.kdd.splits if args.splits is None else args.splits
    per_split, runs = [], []
    for s in range(splits):
        data, run_dir = os.path.join(args.out, "data", f"split_{s}"), os.path.join(args.out, f"split_{s}")
        if not os.path.exists(os.path.join(data, "test", "manifest.json")):
            print(f"split {s}/{splits}: writing its data to {data}", flush=True)
            convert_kdd(data, args.csv, seed=s)
        overrides = [
            *args.overrides,
            f"data.url={os.path.join(data, 'train')}",
            f"eval.kdd.test_data={os.path.join(data, 'test')}",
            f"output_dir={run_dir}",
            f"train.seed={s}",
            "eval.kdd.protocol=paper",
            "eval.every=0",  # the protocol's evaluations only: the last ones are the epoch ends
        ]
        print(f"split {s}/{splits}: training {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "trainer.main", "--config", args.config, *overrides]
        status = subprocess.run(cmd, env=_child_env()).returncode
        if status == EXIT_USER_ERROR:  # a setting or file the run refused (its error above): rerunning would too
            print(f"split {s}: the run refused its settings (see above); fix them and rerun", file=sys.stderr)
            return status
        if status != 0:
            print(f"split {s}: the run ended with status {status}; rerun this command to resume it", file=sys.stderr)
            return status
        records = epoch_evaluations(run_dir)
        per_split.append(split_summary(records, cfg.eval.kdd.last_epochs))
        runs.append({"split": s, "run": run_dir, "steps": [r["step"] for r in records[-cfg.eval.kdd.last_epochs :]]})
    summary = aggregate(per_split)
    record = {
        "protocol": f"{splits} random 50/50 splits x the mean of the last {cfg.eval.kdd.last_epochs} epochs' "
        "evaluations; mean and std (ddof=0) over the splits",
        "csv": inputs["csv"],
        "config": args.config,
        "overrides": args.overrides,
        "splits": [{**r, "epoch_mean": m} for r, m in zip(runs, per_split, strict=True)],
        "summary": summary,
    }
    path = os.path.join(args.out, "protocol.json")
    with write_replacing(path) as f:
        strict_json.dump(record, f, indent=2)
    print(f"\nKDD Cup 99, {splits} splits x last {cfg.eval.kdd.last_epochs} epochs (mean ± std over splits):")
    print(format_summary(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
