"""Draws samples from a trained run, refined by latent MALA as the run's evaluation does, and saves
a picture.

    python -m trainer.sample --run runs/toy_25gaussians
    python -m trainer.sample --run runs/toy_25gaussians --mala-steps 100 --num 10000
    python -m trainer.sample --run runs/toy_25gaussians --checkpoint runs/.../checkpoints/step_00001000 --npy s.npy

The number of samples, the seed and the MALA settings default to the run's own (eval.num_samples,
eval.seed, eval.mala): the same checkpoint gives the same samples and numbers as trainer.evaluate.
2D data gives a scatter over the data; images give a PNG grid; other data (KDD's records) no
picture: --npy saves the samples. For toy data sets the mode metrics are printed too, and the MALA
acceptance rate when MALA runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from data_pipeline.cli import (
    FIGURE_FORMATS,
    UserError,
    add_debug_flag,
    check_output_file,
    run_tool,
    unwritable,
)
from data_pipeline.toy import mode_metrics
from models.config import MALAConfig
from trainer import strict_json
from trainer.evaluation.toy import toy_references, written_std
from trainer.nofollow import write_replacing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest intact one)")
    p.add_argument("--num", type=int, help="number of samples (default: the run's eval.num_samples)")
    p.add_argument("--mala-steps", type=int, help="latent MALA steps, 0: plain G(z) (default: eval.mala.steps)")
    p.add_argument("--step-size", type=float, help="MALA step size (default: the run's eval.mala.step_size)")
    p.add_argument("--temperature", type=float, help="MALA temperature (default: the run's eval.mala.temperature)")
    p.add_argument("--seed", type=int, help="the random draws (default: the run's eval.seed)")
    p.add_argument("--out", help="the figure: .png, .pdf or .svg (default: <run>/samples[_mala<N>].png)")
    p.add_argument("--npy", help="also save the samples as a .npy array")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _sample(args), args.debug)


def check_flags(args: argparse.Namespace) -> None:
    """The flags that override the run's settings, checked against the same ranges as the config's
    eval.num_samples, eval.seed and eval.mala.* (ConfigError naming the flag), before anything loads."""
    from trainer.config import check_field
    from trainer.evaluation import EvalSettings

    fields = {f.name: f for f in (*dataclasses.fields(EvalSettings), *dataclasses.fields(MALAConfig))}
    for flag, name in (("--num", "num_samples"), ("--seed", "seed"), ("--mala-steps", "steps"),
                       ("--step-size", "step_size"), ("--temperature", "temperature")):  # fmt: skip
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            check_field(flag, value, fields[name])
    if args.out:
        check_output_file(args.out, "--out", FIGURE_FORMATS)
    if args.npy:
        check_output_file(args.npy, "--npy", {".npy": "npy"})
    check_outputs_spare_the_run(args)


def check_outputs_spare_the_run(args: argparse.Namespace) -> None:
    """Refuses an --out or --npy that would replace one of the run's own files (a checkpoint's weights,
    config.yaml, metrics.jsonl; it went silently, and the next tool fell back to an older checkpoint)
    or the other output."""
    from trainer.nofollow import MANAGED

    run = os.path.realpath(args.run)
    kept = [os.path.join(run, name) for name in MANAGED if name != "eval"]
    if args.checkpoint:
        kept.append(os.path.realpath(args.checkpoint))
    given = [(flag, path) for flag, path in (("--out", args.out), ("--npy", args.npy)) if path]
    for flag, path in given:
        real = os.path.realpath(path)
        if any(real == k or real.startswith(k + os.sep) for k in kept):
            raise UserError(f"{flag} {path} would replace the run's own {real}: choose a path outside it")
    if len(given) == 2 and os.path.realpath(args.out) == os.path.realpath(args.npy):
        raise UserError(f"--out and --npy are the same file ({args.out}): the picture and the array need two")


def _sample(args: argparse.Namespace) -> int:
    check_flags(args)
    # torch and matplotlib (seconds to import) once the flags are good: --help and a wrong flag answer at once.
    from trainer.evaluation.sampling import generate
    from trainer.plots import image_grid, scatter_2d
    from trainer.run_folder import load_networks, ready_to_draw

    cfg, nets, checkpoint, info = load_networks(args.run, args.checkpoint)
    shape = list(info["sample_shape"])
    pictured = shape == [2] or len(shape) == 3  # a scatter over the data, or an image grid
    if args.out and not pictured:
        raise UserError(
            f"--out {args.out}: samples of shape {tuple(shape)} have no picture (2-D points and images have): "
            "give --npy to save them"
        )
    run_mala = cfg.eval.mala
    mala = MALAConfig(
        steps=run_mala.steps if args.mala_steps is None else args.mala_steps,
        step_size=run_mala.step_size if args.step_size is None else args.step_size,
        temperature=run_mala.temperature if args.temperature is None else args.temperature,
    )
    num = cfg.eval.num_samples if args.num is None else args.num
    suffix = f"_mala{mala.steps}" if mala.steps else ""
    out = (args.out or os.path.join(args.run, f"samples{suffix}.png")) if pictured else None
    if out and not args.out:  # the picture's default place, in the run folder: said before the sampling
        problem = unwritable(os.path.dirname(os.path.abspath(out)))
        if problem:
            raise UserError(f"{problem}: the picture goes to {out} unless --out says where; give --out")
    ready_to_draw(nets, cfg.eval.seed if args.seed is None else args.seed)
    plain, refined, acceptance = generate(nets.energy, nets.generator, num, cfg.model.z_dim, mala)
    samples = (refined if refined is not None else plain).cpu()
    report: dict[str, float | str] = {"checkpoint": checkpoint, "num_samples": num, "mala_steps": mala.steps}
    if mala.steps:
        report.update(mala_step_size=mala.step_size, mala_temperature=mala.temperature, mala_acceptance_rate=acceptance)
    if shape == [2]:
        dataset = info.get("dataset", "")
        _, rule, data = toy_references(dataset, cfg.data.url, cfg.eval.toy.std, written_std(cfg.data, dataset))
        if rule is not None:
            report.update(mode_metrics(samples.numpy(), rule))
        lim = float(np.abs(data).max() * 1.25) if data is not None else float(samples.abs().max() * 1.1)
        scatter_2d(out, samples.numpy(), data, f"{os.path.basename(checkpoint)}, MALA steps {mala.steps}", lim)
    elif pictured:
        shown = min(len(samples), 256)
        how = f"after {mala.steps} latent MALA steps" if mala.steps else "G(z)"
        image_grid(out, samples[:256], nrow=16, caption=f"{os.path.basename(checkpoint)}: {shown} samples, {how}")
    if args.npy:
        os.makedirs(os.path.dirname(os.path.abspath(args.npy)), exist_ok=True)
        with write_replacing(args.npy, binary=True) as f:  # a file object: np.save would add .npy to a bare path
            np.save(f, samples.numpy())
    print(strict_json.dumps(report, indent=2))
    for path in (out, args.npy):
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
