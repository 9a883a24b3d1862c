"""Evaluation, one small evaluator per experiment behind a registry; each owns a config section.

| kind          | metrics                                                                 | section            |
|---------------|-------------------------------------------------------------------------|--------------------|
| toy           | modes with >= 1 / >= 20 high-quality samples, high-quality share         | eval.toy           |
| kdd           | precision, recall, F1 at a percentile, AUROC, AUPRC; energy and grad-norm | eval.kdd           |
| mnist_anomaly | AUPRC, AUROC of the held-out digit; energy and gradient-norm scores       | eval.mnist_anomaly |
| stackedmnist  | modes hit and KL(mode histogram || uniform), a digit classifier per channel | eval.stackedmnist |
| fid           | FID and KID against cached reference statistics                          | eval.fid           |
| samples       | pictures only                                                            |                    |

Adding an experiment: one module with its evaluator class - its ``kind``, its ``config`` section (a
dataclass, which becomes eval.<kind>), the files it ``requirements`` and the settings it ``check``s -
and one line in REGISTRY; the module imports torch where it is used (REGISTRY says why). Files a
kind needs are checked by ``check_requirements`` before a run or an evaluation starts, naming the
file and the command that makes it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Literal

from data_pipeline.cli import ConfigError
from models.config import MALAConfig
from trainer.evaluation.base import EvalContext, Evaluator

# One line per experiment: "module:class". Every module here is imported whenever a configuration
# loads, since its config section becomes eval.<kind>; so an evaluator module imports torch, numpy
# and the scores inside the methods that use them, not at module level, and --print-config costs no
# torch. That keeps an experiment in one file (its section beside the code that reads it), where a
# registry of config classes apart from their evaluators would split each experiment in two.
REGISTRY = (
    "trainer.evaluation.toy:ToyEvaluator",
    "trainer.evaluation.anomaly:KDDEvaluator",
    "trainer.evaluation.anomaly:MNISTAnomalyEvaluator",
    "trainer.evaluation.stackedmnist:StackedMNISTEvaluator",
    "trainer.evaluation.fid_kid:FIDEvaluator",
    "trainer.evaluation.base:Evaluator",  # samples: pictures only
)


def _load(entry: str) -> type[Evaluator]:
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


EVALUATORS: dict[str, type[Evaluator]] = {cls.kind: cls for cls in map(_load, REGISTRY)}
EvalKind = Literal[tuple(EVALUATORS)]  # type: ignore[valid-type]


@dataclass
class EvalSettings:
    """What every evaluation shares; EvalConfig adds ``kind`` and one section per evaluator."""

    every: int = field(default=1000, metadata={"range": "[0, 1e12]"})  # steps between evaluations (0: at the end)
    num_samples: int = field(default=2500, metadata={"range": "[1, 10000000]"})
    # Every evaluation draws from this seed: the same checkpoint gives the same numbers during training
    # and from meg-evaluate / meg-sample (their --seed overrides it).
    seed: int = field(default=0, metadata={"range": "[0, 4294967295]"})
    mala: MALAConfig = field(default_factory=lambda: MALAConfig(steps=5))
    plots: bool = True

    def section(self):
        return getattr(self, self.kind, None)


# kind (what to measure: the table above) and the sections of the registered evaluators.
EvalConfig = make_dataclass(
    "EvalConfig",
    [("kind", EvalKind, field(default="samples"))]
    + [(kind, cls.config, field(default_factory=cls.config)) for kind, cls in EVALUATORS.items() if cls.config],
    bases=(EvalSettings,),
    namespace={"__module__": __name__},
)


def requirements(cfg) -> list[tuple[str, str, str]]:
    """(key, path, how to make it) for every file the run's evaluation reads (``cfg``: a RunConfig)."""
    return EVALUATORS[cfg.eval.kind].requirements(cfg)


def check_requirements(cfg) -> None:
    """Raises ConfigError naming the first missing file and the command that makes it, then what the
    evaluation's own check finds (a file that is not what it should be is a DataError naming it)."""
    for key, path, make in requirements(cfg):
        if not path:
            raise ConfigError(f"eval.kind={cfg.eval.kind} needs {key}; {make}")
        local = "://" not in path or path.startswith("file://")
        if local and not os.path.exists(path.removeprefix("file://")):
            raise ConfigError(f"{key}={path} does not exist; {make}")
    EVALUATORS[cfg.eval.kind].check(cfg)


def extra_evaluation_steps(cfg, stream) -> set[int]:
    """Steps the evaluation asks for besides every ``eval.every``-th and the last (``cfg``: a RunConfig;
    ``stream``: its ShardStream), e.g. the ends of the last epochs under ``eval.kdd.protocol=paper``."""
    return EVALUATORS[cfg.eval.kind].extra_evaluation_steps(cfg, stream)


def build_evaluator(cfg, sample_shape: list[int], dataset: str, out_dir: str | None = None) -> Evaluator:
    """The evaluator ``cfg.eval.kind`` names (``cfg``: a RunConfig), writing to ``out_dir``
    (default: the run folder's eval/)."""
    from trainer.evaluation.toy import written_std

    ctx = EvalContext(
        sample_shape=list(sample_shape),
        z_dim=cfg.model.z_dim,
        dataset=dataset,
        out_dir=out_dir or os.path.join(cfg.output_dir, "eval"),
        entropy_weight=cfg.train.entropy_weight,
        data_url=cfg.data.url,
        toy_std=written_std(cfg.data, dataset),
    )
    check_samples(cfg, sample_shape)
    return EVALUATORS[cfg.eval.kind](cfg.eval, cfg.eval.section(), ctx)


def check_samples(cfg, sample_shape: list[int]) -> None:
    """Raises ConfigError when ``cfg.eval.kind`` cannot score the data's samples (FID on 2D points)."""
    EVALUATORS[cfg.eval.kind].check_samples(cfg, list(sample_shape))


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
    "check_samples",
    "format_table",
    "extra_evaluation_steps",
]
