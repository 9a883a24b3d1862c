"""Evaluation, one small evaluator per experiment behind a registry; each owns a config section.

| kind          | metrics                                                                 | section            |
|---------------|-------------------------------------------------------------------------|--------------------|
| toy           | modes with >= 1 / >= 20 high-quality samples, high-quality share         | eval.toy           |
| kdd           | precision, recall, F1 at a percentile, AUROC, AUPRC; energy and grad-norm | eval.kdd           |
| mnist_anomaly | AUPRC, AUROC of the held-out digit; energy and gradient-norm scores       | eval.mnist_anomaly |
| stackedmnist  | modes hit and KL(mode histogram || uniform), a digit classifier per channel | eval.stackedmnist |
| fid           | FID and KID against cached reference statistics                          | eval.fid           |
| samples       | pictures only                                                            |                    |

Adding an experiment: one module with its evaluator (and config section), and one line in EVALUATORS
(and the section's field in EvalConfig). Files a kind needs are checked by ``check_requirements``
before a run or an evaluation starts, naming the file and the command that makes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.cli import ConfigError
from models.mala import MALAConfig
from trainer.evaluation.anomaly import (
    KDDEvalConfig,
    KDDEvaluator,
    MNISTAnomalyEvalConfig,
    MNISTAnomalyEvaluator,
    protocol_steps,
)
from trainer.evaluation.base import EvalContext, Evaluator, generate
from trainer.evaluation.fid_kid import FIDEvalConfig, FIDEvaluator
from trainer.evaluation.stackedmnist import StackedMNISTEvalConfig, StackedMNISTEvaluator
from trainer.evaluation.toy import ToyEvalConfig, ToyEvaluator, toy_reference

EVALUATORS: dict[str, type[Evaluator]] = {
    "toy": ToyEvaluator,
    "kdd": KDDEvaluator,
    "mnist_anomaly": MNISTAnomalyEvaluator,
    "stackedmnist": StackedMNISTEvaluator,
    "fid": FIDEvaluator,
    "samples": Evaluator,
}
EvalKind = Literal["toy", "kdd", "mnist_anomaly", "stackedmnist", "fid", "samples"]


@dataclass
class EvalConfig:
    kind: EvalKind = "samples"  # what to measure (the table above); the section of the same name configures it
    every: int = field(default=1000, metadata={"range": "[0, 1e12]"})  # steps between evaluations (0: at the end)
    num_samples: int = field(default=2500, metadata={"range": "[1, 10000000]"})
    # Every evaluation draws from this seed: the same checkpoint gives the same numbers during training
    # and from meg-evaluate / meg-sample (their --seed overrides it).
    seed: int = field(default=0, metadata={"range": "[0, 4294967295]"})
    mala: MALAConfig = field(default_factory=lambda: MALAConfig(steps=5))
    plots: bool = True
    toy: ToyEvalConfig = field(default_factory=ToyEvalConfig)
    kdd: KDDEvalConfig = field(default_factory=KDDEvalConfig)
    mnist_anomaly: MNISTAnomalyEvalConfig = field(default_factory=MNISTAnomalyEvalConfig)
    stackedmnist: StackedMNISTEvalConfig = field(default_factory=StackedMNISTEvalConfig)
    fid: FIDEvalConfig = field(default_factory=FIDEvalConfig)

    def section(self):
        return getattr(self, self.kind, None)


def requirements(cfg) -> list[tuple[str, str, str]]:
    """(key, path, how to make it) for every file the run's evaluation reads (``cfg``: a RunConfig)."""
    e = cfg.eval
    written_by = (
        f"it is written with the training data by: {cfg.data.prepare}"
        if cfg.data.prepare
        else "write it with python -m data_pipeline.convert (--help lists the sources)"
    )
    if e.kind == "kdd":
        return [("eval.kdd.test_data", e.kdd.test_data, written_by)]
    if e.kind == "mnist_anomaly":
        return [("eval.mnist_anomaly.test_data", e.mnist_anomaly.test_data, written_by)]
    if e.kind == "stackedmnist":
        make = (
            f"make it with: python -m trainer.classifier --data data/mnist-test --out {e.stackedmnist.classifier} "
            "(the digits: python -m data_pipeline.convert mnist --images t10k-images-idx3-ubyte.gz --labels "
            "t10k-labels-idx1-ubyte.gz --out data/mnist-test)"
        )
        return [("eval.stackedmnist.classifier", e.stackedmnist.classifier, make)]
    if e.kind == "fid":
        make = f"make it with: python -m trainer.fid --data {cfg.data.url} --out {e.fid.reference or 'PATH'}"
        needed = [("eval.fid.reference", e.fid.reference, make)]
        if e.fid.inception:
            needed.append(("eval.fid.inception", e.fid.inception, "a TorchScript Inception of your own"))
        return needed
    return []


def check_requirements(cfg) -> None:
    """Raises ConfigError naming the first missing file and the command that makes it."""
    if cfg.eval.kind == "mnist_anomaly" and cfg.eval.mnist_anomaly.digit == -1:
        raise ConfigError("eval.kind=mnist_anomaly needs eval.mnist_anomaly.digit (the held-out digit, 0..9)")
    for key, path, make in requirements(cfg):
        if not path:
            raise ConfigError(f"eval.kind={cfg.eval.kind} needs {key}; {make}")
        local = "://" not in path or path.startswith("file://")
        if local and not os.path.exists(path.removeprefix("file://")):
            raise ConfigError(f"{key}={path} does not exist; {make}")


def protocol_evaluation_steps(cfg, stream) -> set[int]:
    """Steps evaluated besides every ``eval.every``-th and the last one: with ``eval.kdd.protocol=paper``
    the ends of the last ``eval.kdd.last_epochs`` epochs (``cfg``: a RunConfig; ``stream``: its ShardStream)."""
    kdd = cfg.eval.kdd
    if cfg.eval.kind != "kdd" or kdd.protocol != "paper":
        return set()
    epoch = kdd.epoch_steps or max(stream.batches_per_epoch(0) // cfg.train.energy_steps, 1)
    return set(protocol_steps(cfg.train.steps, epoch, kdd.last_epochs))


def build_evaluator(cfg, sample_shape: list[int], dataset: str, out_dir: str | None = None) -> Evaluator:
    """The evaluator ``cfg.eval.kind`` names (``cfg``: a RunConfig), writing to ``out_dir``
    (default: the run folder's eval/)."""
    ctx = EvalContext(
        sample_shape=list(sample_shape),
        z_dim=cfg.model.z_dim,
        dataset=dataset,
        out_dir=out_dir or os.path.join(cfg.output_dir, "eval"),
        entropy_weight=cfg.train.entropy_weight,
        data_url=cfg.data.url,
    )
    return EVALUATORS[cfg.eval.kind](cfg.eval, cfg.eval.section(), ctx)


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


__all__ = [
    "EVALUATORS",
    "EvalConfig",
    "EvalContext",
    "Evaluator",
    "build_evaluator",
    "check_requirements",
    "format_table",
    "protocol_evaluation_steps",
    "generate",
    "toy_reference",
]
