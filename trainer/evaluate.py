"""Evaluates a checkpoint of a run: its experiment's metrics, with and without latent MALA.

    python -m trainer.evaluate --run runs/kdd99 [--checkpoint DIR] [eval.key=value ...]

Reads the checkpoint's weights export and configuration (any engine's run), applies the overrides
(``eval.*`` and ``data.*`` only, e.g. ``eval.mala.steps=20``,
``eval.kind=fid eval.fid.reference=stats/train.npz``), and writes
``eval/eval_<checkpoint>.json`` (``eval_<kind>_<checkpoint>.json`` for another eval.kind than the
run's) plus a table; the run's own ``eval/latest.json`` stays the trainer's. A --checkpoint must be
one of the run's (a bare step_XXXXXXXX names one). What each kind measures: trainer/evaluation/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from data_pipeline.cli import ConfigError, DataError, add_debug_flag, run_tool, unwritable
from trainer.config import check_commands, check_field, load_config, shown
from trainer.evaluation import EvalSettings, build_evaluator, check_requirements, check_samples, format_table

# What an evaluation may change: its own settings, and where the data lives now. The rest (the model,
# the training, the entropy weight that is the target density's temperature) is the checkpoint's.
EVALUATION_SECTIONS = ("eval.", "data.")


def check_overrides(overrides: list[str]) -> None:
    """Raises ConfigError, before any work, for an override outside EVALUATION_SECTIONS: the
    evaluation would run without it, and its results would pass for the changed setting's. One
    without a value ("eval.num_samples 5") is named as such, not as outside those sections."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(
                f"override {shown(override)} must look like section.key=value (e.g. eval.num_samples=1000)"
            )
    ignored = [o.split("=", 1)[0] for o in overrides if not o.startswith(EVALUATION_SECTIONS)]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)}: an evaluation takes only eval.* and data.* overrides; the checkpoint "
            "fixes the model and its training (train a run with the setting to evaluate it)"
        )


def check_data_shape(cfg, sample_shape: list[int]) -> None:
    """Raises ConfigError when data.url (given to evaluate the run on data that has moved) holds samples
    of another shape than the checkpoint's: the pictures put them beside its samples as the training
    data (a traceback after the whole evaluation for records, another data set's images captioned so)."""
    from data_pipeline.shards import read_manifest

    try:
        shape = list(read_manifest(cfg.data.url, check_shards=False).sample_shape)
    except (DataError, OSError, ValueError):  # data gone: the evaluation goes without it, as its parts say
        return
    if shape != list(sample_shape):
        raise ConfigError(
            f"data.url={cfg.data.url} holds samples of shape {tuple(shape)}, this checkpoint's are "
            f"{tuple(sample_shape)}: give data.url where the run's training data is now (or leave it out)"
        )


def check_writable(out_dir: str) -> None:
    """Raises ConfigError when no file can be made in the run's eval/ folder (a colleague's run, a read-only
    mount): the evaluation ran whole (FID, MALA: hours), then failed naming its temporary file."""
    problem = unwritable(out_dir)  # a file there: the run folder check's
    if problem:
        raise ConfigError(
            f"{problem}: evaluate writes its results into the run's eval/ folder; make it writable, "
            "or evaluate a copy of the run folder"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the run folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest intact one)")
    parser.add_argument("--seed", type=int, help="the evaluation's random draws (default: the run's eval.seed)")
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run a shell command)")
    parser.add_argument(
        "--trust-inception", action="store_true", help="load eval.fid.inception (TorchScript runs code when loaded)"
    )
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value", help="e.g. eval.mala.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
    return run_tool(lambda: _evaluate(args), args.debug)


def _evaluate(args: argparse.Namespace) -> int:
    # torch (seconds to import) only once there is work: --help and a wrong flag answer at once.
    from trainer.run_folder import load_networks, ready_to_draw

    check_overrides(args.overrides)
    if args.seed is not None:  # eval.seed's range, as meg-sample checks it (a huge one was a traceback)
        check_field("--seed", args.seed, next(f for f in dataclasses.fields(EvalSettings) if f.name == "seed"))
    # The checkpoint is resolved once (by load_networks): resolving it again checks it, and warns, twice.
    _, nets, checkpoint, info = load_networks(args.run, args.checkpoint)
    # The checkpoint's own configuration is the preset; overrides adjust the evaluation.
    cfg = load_config(os.path.join(checkpoint, "config.yaml"), [f"output_dir={args.run}", *args.overrides])
    check_commands(cfg, allow_pipe=args.allow_pipe, trust_inception=args.trust_inception)
    # Whether the kind can score these samples at all comes first: else it asked for a classifier
    # (or FID statistics) to be made, and only then said that they cannot score 2-D points.
    check_samples(cfg, info["sample_shape"])
    if any(o.startswith("data.url=") for o in args.overrides):  # the run's own was its data's when it trained
        check_data_shape(cfg, info["sample_shape"])
    check_requirements(cfg)
    check_writable(os.path.join(args.run, "eval"))
    if args.seed is not None:  # the evaluation's records say the seed that drew them
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=args.seed))
    ready_to_draw(nets, cfg.eval.seed)
    evaluator = build_evaluator(cfg, info["sample_shape"], info.get("dataset", ""))
    # Another kind than the run's own gets files of its own: its results do not replace the run's kind's.
    own_kind = load_config(os.path.join(checkpoint, "config.yaml")).eval.kind
    kind = "" if cfg.eval.kind == own_kind else f"{cfg.eval.kind}_"
    tag = f"eval_{kind}{os.path.basename(checkpoint.rstrip('/'))}"
    results = evaluator(int(info["step"]), nets.energy, nets.generator, tag=tag)
    print(f"{args.run} at {os.path.basename(checkpoint.rstrip('/'))} ({evaluator.kind}):")
    print(format_table(results))
    print(f"wrote {os.path.join(evaluator.ctx.out_dir, tag + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
