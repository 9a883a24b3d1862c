"""Anomaly detection from the energy (and its gradient norm) on a labelled test split: KDD Cup 99
(precision, recall and F1 at a percentile threshold) and MNIST with one held-out digit (AUPRC); AUROC
and AUPRC for both, as later methods report them. ``eval.kdd.protocol=paper`` also evaluates at the
end of each of the last ``last_epochs`` epochs; trainer/kdd_protocol.py runs the splits and averages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from data_pipeline.cli import ConfigError
from data_pipeline.config import PATH_FIELD
from trainer.evaluation.base import Evaluator, written_with_the_data

if TYPE_CHECKING:  # numpy and the scores are imported where they are used (see REGISTRY)
    import numpy as np


@dataclass
class KDDEvalConfig:
    # The labelled test split (label 1 = anomaly).
    test_data: str = field(default="data/kdd99/test", metadata=PATH_FIELD)
    # Flag the scores above this percentile (the share of anomalies: 20%).
    percentile: float = field(default=80.0, metadata={"range": "[0, 100]"})
    # single: the scheduled evaluations only. paper (the paper's protocol): also one at the end of each of
    # the last `last_epochs` epochs, counted back from train.steps; `python -m trainer.kdd_protocol`
    # trains `splits` random 50/50 splits so and reports mean ± std of the per-split epoch means.
    protocol: Literal["single", "paper"] = "single"
    last_epochs: int = field(default=10, metadata={"range": "[1, 1000]"})
    splits: int = field(default=5, metadata={"range": "[1, 100]"})
    # Steps in a protocol epoch; 0: one pass over the training split (batches per epoch / energy_steps).
    epoch_steps: int = field(default=0, metadata={"range": "[0, 1e12]"})


@dataclass
class MNISTAnomalyEvalConfig:
    test_data: str = field(default="", metadata=PATH_FIELD)  # the labelled test split of `convert mnist-anomaly`
    digit: int = field(default=-1, metadata={"range": "[-1, 9]"})  # the held-out digit: the anomaly (-1: unset)

    def __post_init__(self) -> None:
        if self.digit != -1 and not 0 <= self.digit <= 9:
            raise ValueError(f"eval.mnist_anomaly.digit must be 0..9, got {self.digit}")


def _anomaly_digit(url: str) -> int | None:
    """The digit a `convert mnist-anomaly` data set at ``url`` was written without (its manifest says);
    None for other data, shards without a manifest, or one that cannot be read (its reader names that)."""
    from data_pipeline.shards import DataError, looks_like_shards, read_manifest

    if not url or looks_like_shards(url):
        return None
    try:
        digit = read_manifest(url, check_shards=False).preprocessing.get("anomaly_digit")
    except (DataError, OSError, ValueError):
        return None
    return digit if isinstance(digit, int) and not isinstance(digit, bool) else None


def _test_split(url: str) -> dict:
    from data_pipeline.shards import read_manifest
    from data_pipeline.stream import read_split

    return read_split(read_manifest(url))


class _AnomalyEvaluator(Evaluator):
    def __init__(self, eval_cfg, section, ctx):
        super().__init__(eval_cfg, section, ctx)
        self._test: dict | None = None

    def is_anomaly(self, labels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def metrics(self, scores: np.ndarray, is_anomaly: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        """The test split's samples are the training data's shape (else the energy fails on them after the
        training: "mat1 and mat2 shapes cannot be multiplied")."""
        from data_pipeline.shards import DataError, looks_like_shards, read_manifest

        key = f"eval.{cls.kind}.test_data"
        test_data = getattr(cfg.eval, cls.kind).test_data
        try:
            tested = list(read_manifest(test_data).sample_shape)
        except DataError as e:
            if looks_like_shards(test_data):  # an existing .tar: the evaluation's read refused it after the training
                raise ConfigError(f"{key}: {e}") from None
            return  # missing or unreadable: check_requirements, or the evaluation's read, names it
        if tested != list(sample_shape):
            raise ConfigError(
                f"{key}={test_data} holds samples of shape {tuple(tested)}, the training data "
                f"{tuple(sample_shape)}: give the test split written with data.url={cfg.data.url}"
            )

    def score_energy(self, energy) -> dict[str, float]:
        from trainer.scores import anomaly_scores

        if self._test is None:
            self._test = _test_split(self.section.test_data)
        x = self._test["x"].to(next(energy.parameters()).device)
        is_anomaly = self.is_anomaly(self._test["label"])
        results: dict[str, float] = {"test_samples": len(x), "anomaly_share": float(is_anomaly.mean())}
        for score in ("energy", "grad_norm"):
            values = anomaly_scores(energy, x, score)
            results.update({f"{score}_{k}": v for k, v in self.metrics(values, is_anomaly).items()})
        return results


class KDDEvaluator(_AnomalyEvaluator):
    kind = "kdd"
    config = KDDEvalConfig

    @classmethod
    def requirements(cls, cfg) -> list[tuple[str, str, str]]:
        return [("eval.kdd.test_data", cfg.eval.kdd.test_data, written_with_the_data(cfg, "kdd"))]

    @classmethod
    def extra_evaluation_steps(cls, cfg, stream) -> set[int]:
        """Under ``eval.kdd.protocol=paper``: the ends of the last ``eval.kdd.last_epochs`` epochs."""
        kdd = cfg.eval.kdd
        if kdd.protocol != "paper":
            return set()
        epoch = kdd.epoch_steps or max(stream.batches_per_epoch(0) // cfg.train.energy_steps, 1)
        steps = protocol_steps(cfg.train.steps, epoch, kdd.last_epochs)
        if len(steps) < kdd.last_epochs:  # trainer/kdd_protocol.py found it only after the whole run
            raise ConfigError(
                f"eval.kdd.protocol=paper averages the last eval.kdd.last_epochs={kdd.last_epochs} epochs, and "
                f"train.steps={cfg.train.steps} reaches {len(steps)} of them (epochs of {epoch} steps): raise "
                f"train.steps to at least {(kdd.last_epochs - 1) * epoch + 1}, or set eval.kdd.epoch_steps or "
                "eval.kdd.last_epochs"
            )
        return set(steps)

    def is_anomaly(self, labels):
        return labels == 1

    def metrics(self, scores, is_anomaly):
        from trainer.scores import auprc, auroc, precision_recall_f1_at_percentile

        return {
            **precision_recall_f1_at_percentile(scores, is_anomaly, self.section.percentile),
            "auroc": auroc(scores, is_anomaly),
            "auprc": auprc(scores, is_anomaly),
        }


class MNISTAnomalyEvaluator(_AnomalyEvaluator):
    kind = "mnist_anomaly"
    config = MNISTAnomalyEvalConfig

    @classmethod
    def requirements(cls, cfg) -> list[tuple[str, str, str]]:
        return [
            (
                "eval.mnist_anomaly.test_data",
                cfg.eval.mnist_anomaly.test_data,
                written_with_the_data(cfg, "mnist-anomaly"),
            )
        ]

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.eval.mnist_anomaly.digit == -1:
            raise ConfigError("eval.kind=mnist_anomaly needs eval.mnist_anomaly.digit (the held-out digit, 0..9)")

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        """As the other anomaly evaluations, and the digit is the one the data was written without: another
        one trained on data holding it and scored it as the anomaly, a wrong AUPRC without a word."""
        super().check_samples(cfg, sample_shape)
        digit = cfg.eval.mnist_anomaly.digit
        for key, url in (
            ("data.url", cfg.data.url),
            ("eval.mnist_anomaly.test_data", cfg.eval.mnist_anomaly.test_data),
        ):
            held = _anomaly_digit(url)
            if held is not None and held != digit:
                raise ConfigError(
                    f"eval.mnist_anomaly.digit={digit}, but {key}={url} was written with digit {held} held out (its "
                    f"manifest's anomaly_digit): give data.url and eval.mnist_anomaly.test_data written for digit "
                    f"{digit} (python -m data_pipeline.convert mnist-anomaly ... --digit {digit}), or set the digit "
                    f"to {held}"
                )

    def is_anomaly(self, labels):
        return labels == self.section.digit

    def metrics(self, scores, is_anomaly):
        from trainer.scores import auprc, auroc

        return {"auprc": auprc(scores, is_anomaly), "auroc": auroc(scores, is_anomaly)}


def protocol_steps(total_steps: int, epoch_steps: int, last_epochs: int) -> list[int]:
    """The steps that end the last ``last_epochs`` epochs of a run of ``total_steps``, counted back from
    its end (the first epochs that start before step 0 are left out), in order."""
    if epoch_steps < 1:
        raise ValueError(f"an epoch must last at least one step, got {epoch_steps}")
    return sorted(total_steps - k * epoch_steps for k in range(last_epochs) if total_steps - k * epoch_steps > 0)


def mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per numeric key of every row: mean and population standard deviation (numpy's, ddof=0)."""
    import numpy as np

    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    keys = [k for k in rows[0] if all(k in r and numeric(r[k]) for r in rows)] if rows else []
    out = {}
    for k in keys:
        values = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}
    return out
