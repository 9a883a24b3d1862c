"""Anomaly detection from the energy (and its gradient norm) on a labelled test split: KDD Cup 99
(precision, recall and F1 at a percentile threshold) and MNIST with one held-out digit (AUPRC); AUROC
and AUPRC for both, as later methods report them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainer.evaluation.base import Evaluator
from trainer.scores import anomaly_scores, auprc, auroc, precision_recall_f1_at_percentile


@dataclass
class KDDEvalConfig:
    test_data: str = "data/kdd99/test"  # the labelled test split (label 1 = anomaly)
    # Flag the scores above this percentile (the share of anomalies: 20%).
    percentile: float = field(default=80.0, metadata={"range": "[0, 100]"})


@dataclass
class MNISTAnomalyEvalConfig:
    test_data: str = ""  # the labelled test split of `convert mnist-anomaly`
    digit: int = field(default=-1, metadata={"range": "[-1, 9]"})  # the held-out digit: the anomaly (-1: unset)

    def __post_init__(self) -> None:
        if self.digit != -1 and not 0 <= self.digit <= 9:
            raise ValueError(f"eval.mnist_anomaly.digit must be 0..9, got {self.digit}")


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

    def score_energy(self, energy) -> dict[str, float]:
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

    def is_anomaly(self, labels):
        return labels == 1

    def metrics(self, scores, is_anomaly):
        return {
            **precision_recall_f1_at_percentile(scores, is_anomaly, self.section.percentile),
            "auroc": auroc(scores, is_anomaly),
            "auprc": auprc(scores, is_anomaly),
        }


class MNISTAnomalyEvaluator(_AnomalyEvaluator):
    kind = "mnist_anomaly"

    def is_anomaly(self, labels):
        return labels == self.section.digit

    def metrics(self, scores, is_anomaly):
        return {"auprc": auprc(scores, is_anomaly), "auroc": auroc(scores, is_anomaly)}
