"""Evaluates a run: its experiment's metrics, with and without latent MALA where samples count.

During training the trainer calls an ``Evaluator`` every ``eval.every`` steps; afterwards

    python -m trainer.evaluate --run runs/kdd99 [--checkpoint DIR] [eval.key=value ...]

loads the latest (or the given) checkpoint and writes ``eval/<checkpoint>.json`` plus a table.

| kind          | metrics                                                                |
|---------------|------------------------------------------------------------------------|
| toy           | modes with >= 1 / >= 20 high-quality samples, high-quality share        |
| stackedmnist  | modes hit and KL(mode histogram || uniform), digit classifier per channel |
| kdd           | precision, recall, F1 at the 80th percentile, energy and gradient-norm scores |
| mnist_anomaly | AUPRC of the held-out digit, energy and gradient-norm scores            |
| fid           | FID and KID against cached reference statistics                         |
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from data_pipeline.toy import TOY_SPECS, ToySpec, mode_metrics, sample_toy
from models import latent_mala
from models.mala import MALAConfig
from trainer.config import ConfigError, RunConfig
from trainer.plots import energy_landscape, image_grid, scatter_2d
from trainer.scores import (
    anomaly_scores,
    auprc,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mode_coverage,
    precision_recall_f1_at_percentile,
)


@torch.no_grad()
def _generate_plain(generator, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([generator(chunk).float() for chunk in z.split(batch_size)])


def generate(
    energy, generator, num: int, z_dim: int, mala: MALAConfig, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Plain samples G(z), MALA-refined samples (None when mala.steps == 0) and the acceptance rate."""
    device = next(generator.parameters()).device
    z = torch.randn(num, z_dim, device=device)
    plain = _generate_plain(generator, z, batch_size)
    if mala.steps == 0:
        return plain, None, float("nan")
    refined, accepted = [], 0.0
    for chunk in z.split(batch_size):
        result = latent_mala(energy, generator, chunk, mala.steps, mala.step_size, mala.temperature)
        refined.append(result.x.float())
        accepted += float(result.acceptance_rate) * len(chunk)
    return plain, torch.cat(refined), accepted / num


def resolve_kind(cfg: RunConfig, sample_shape: list[int]) -> str:
    e = cfg.eval
    if e.kind != "auto":
        return e.kind
    if sample_shape == [2]:
        return "toy"
    if e.classifier:
        return "stackedmnist"
    if e.test_data:
        return "mnist_anomaly" if e.anomaly_digit >= 0 else "kdd"
    return "fid" if e.fid_reference else "samples"


def _requires(value: str | int, key: str, kind: str) -> None:
    if value in ("", -1):
        raise ConfigError(f"eval.kind={kind} needs {key}")


class Evaluator:
    def __init__(self, cfg: RunConfig, sample_shape: list[int], dataset: str, out_dir: str | None = None):
        self.cfg, self.sample_shape = cfg, sample_shape
        self.out_dir = out_dir or os.path.join(cfg.output_dir, "eval")
        self.kind = resolve_kind(cfg, sample_shape)
        e = cfg.eval
        self.spec: ToySpec | None = None
        self.data: np.ndarray | None = None
        self._test: dict | None = None
        self._classifier = self._inception = self._reference = None
        if self.kind == "toy":
            name = cfg.data.toy or dataset
            if name in TOY_SPECS:
                base = TOY_SPECS[name]
                self.spec = ToySpec(base.name, base.centres, cfg.data.toy_std or base.std)
                self.data, _ = sample_toy(name, 2000, seed=12345, std=self.spec.std)
        elif self.kind in ("kdd", "mnist_anomaly"):
            _requires(e.test_data, "eval.test_data (the labelled test split)", self.kind)
            if self.kind == "mnist_anomaly":
                _requires(e.anomaly_digit, "eval.anomaly_digit", self.kind)
        elif self.kind == "stackedmnist":
            _requires(e.classifier, "eval.classifier (python -m trainer.classifier)", self.kind)
        elif self.kind == "fid":
            _requires(e.fid_reference, "eval.fid_reference (python -m trainer.fid)", self.kind)

    # -- per experiment -----------------------------------------------------------------------

    def _test_split(self) -> dict:
        if self._test is None:
            from data_pipeline.shards import read_manifest
            from data_pipeline.stream import read_split

            self._test = read_split(read_manifest(self.cfg.eval.test_data))
        return self._test

    def _anomaly(self, energy) -> dict[str, float]:
        test = self._test_split()
        device = next(energy.parameters()).device
        x = test["x"].to(device)
        if self.kind == "kdd":
            is_anomaly = test["label"] == 1
        else:
            is_anomaly = test["label"] == self.cfg.eval.anomaly_digit
        results: dict[str, float] = {"test_samples": len(x), "anomaly_share": float(is_anomaly.mean())}
        for score in ("energy", "grad_norm"):
            values = anomaly_scores(energy, x, score)
            if self.kind == "kdd":
                m = precision_recall_f1_at_percentile(values, is_anomaly, self.cfg.eval.anomaly_percentile)
                results.update({f"{score}_{k}": v for k, v in m.items()})
            else:
                results[f"{score}_auprc"] = auprc(values, is_anomaly)
        return results

    def _samples(self, samples: torch.Tensor) -> dict[str, float]:
        if self.kind == "toy" and self.spec is not None and self.spec.centres is not None:
            return mode_metrics(samples.cpu().numpy(), self.spec)
        if self.kind == "stackedmnist":
            from models.classifier import classify_stacked
            from trainer.classifier import load_classifier

            if self._classifier is None:
                self._classifier = load_classifier(self.cfg.eval.classifier).to(samples.device)
            modes = classify_stacked(self._classifier, samples).cpu().numpy()
            return mode_coverage(modes, 10 ** samples.shape[1])
        if self.kind == "fid":
            from trainer.fid import InceptionFeatures, load_statistics

            if self._inception is None:
                self._inception = InceptionFeatures(self.cfg.eval.inception or None, samples.device)
                self._reference = load_statistics(self.cfg.eval.fid_reference)
            features = self._inception(samples)
            ref = self._reference
            results = {"fid": frechet_distance(*feature_statistics(features), ref["mu"], ref["cov"])}
            if "features" in ref:
                results["kid"] = kernel_inception_distance(features, ref["features"])
            return results
        return {}

    def __call__(self, step: int, energy, generator, tag: str | None = None) -> dict[str, float]:
        os.makedirs(self.out_dir, exist_ok=True)
        e = self.cfg.eval
        results: dict[str, float] = {}
        if self.kind in ("kdd", "mnist_anomaly"):
            results.update(self._anomaly(energy))
        plain, refined, acceptance = generate(energy, generator, e.num_samples, self.cfg.model.z_dim, e.mala)
        results.update(self._samples(plain))
        if refined is not None:
            results.update({f"mala_{k}": v for k, v in self._samples(refined).items()})
            results["mala_acceptance_rate"] = acceptance
        if e.plots:
            self._plots(tag or f"step_{step:08d}", step, energy, plain, refined, results)
        record = {"step": step, "kind": self.kind, **results}
        for name in (f"{tag or f'step_{step:08d}'}.json", "latest.json"):
            with open(os.path.join(self.out_dir, name), "w") as f:
                json.dump(record, f, indent=2)
        return results

    def _plots(self, tag, step, energy, plain, refined, results) -> None:
        if self.sample_shape == [2]:
            lim = float(np.abs(self.data).max() * 1.25) if self.data is not None else float(plain.abs().max() * 1.1)
            hq = results.get("high_quality_share")
            title = f"step {step}" + (
                f": {hq:.1%} high quality, {results['modes_with_20']} modes with >= 20" if hq is not None else ""
            )
            scatter_2d(os.path.join(self.out_dir, f"samples_{tag}.png"), plain.cpu().numpy(), self.data, title, lim)
            if refined is not None:
                hq = results.get("mala_high_quality_share")
                title = f"step {step}, latent MALA" + (f": {hq:.1%} high quality" if hq is not None else "")
                scatter_2d(
                    os.path.join(self.out_dir, f"samples_mala_{tag}.png"), refined.cpu().numpy(), self.data, title, lim
                )
            energy_landscape(
                os.path.join(self.out_dir, f"energy_{tag}.png"), energy, lim, f"learned energy, step {step}"
            )
        elif plain.dim() == 4:
            image_grid(os.path.join(self.out_dir, f"samples_{tag}.png"), plain[:64])
            if refined is not None:
                image_grid(os.path.join(self.out_dir, f"samples_mala_{tag}.png"), refined[:64])


def format_table(results: dict[str, float]) -> str:
    """Metric | plain | latent MALA, one row per metric."""
    names = sorted({k.removeprefix("mala_") for k in results if k != "mala_acceptance_rate"})
    rows = [("metric", "plain", "latent MALA")]
    for name in names:
        fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        rows.append((name, fmt(results.get(name)), fmt(results.get(f"mala_{name}"))))
    if "mala_acceptance_rate" in results:
        rows.append(("MALA acceptance rate", "", f"{results['mala_acceptance_rate']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from trainer.config import load_config
    from trainer.run_folder import load_networks

    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the run folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value", help="e.g. eval.mala.steps=100")
    args = parser.parse_args(argv)
    try:
        _, nets, checkpoint, info = load_networks(args.run, args.checkpoint)
        # The checkpoint's own configuration is the preset; overrides adjust the evaluation.
        cfg = load_config(os.path.join(checkpoint, "config.yaml"), args.overrides)
        torch.manual_seed(args.seed)
        evaluator = Evaluator(cfg, info["sample_shape"], info.get("dataset", ""))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for net in (nets.energy, nets.generator):
            net.to(device)
        step = int(os.path.basename(checkpoint.rstrip("/"))[5:])
        results = evaluator(step, nets.energy, nets.generator, tag=f"eval_{os.path.basename(checkpoint)}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.run} at {os.path.basename(checkpoint)} ({evaluator.kind}):")
    print(format_table(results))
    print(f"wrote {os.path.join(evaluator.out_dir, f'eval_{os.path.basename(checkpoint)}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
