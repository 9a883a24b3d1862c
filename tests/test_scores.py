"""Evaluation numbers against hand-computed and analytic values."""

import numpy as np
import pytest
import torch

from trainer.scores import (
    anomaly_scores,
    auprc,
    auroc,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mode_coverage,
    precision_recall_f1_at_percentile,
)


def test_percentile_threshold_precision_recall_f1():
    scores = np.arange(10, dtype=float)  # top 20%: scores 8 and 9
    truth = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])  # anomalies at 7 and 8
    m = precision_recall_f1_at_percentile(scores, truth, 80)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)


def test_scores_tied_at_the_percentile_are_flagged_as_in_the_published_protocol():
    # KDD's duplicated records tie: Zenati et al.'s `scores >= per` flags the whole tied group at the threshold.
    scores = np.array([1.0] * 7 + [2.0] * 2 + [3.0])  # 80th percentile: 2.0, held by two records
    truth = np.array([0] * 7 + [1, 0, 1])
    m = precision_recall_f1_at_percentile(scores, truth, 80)
    assert m["threshold"] == 2.0
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(1.0)


def test_auprc_perfect_random_and_hand_computed():
    truth = np.array([1, 0, 1, 0, 0])
    assert auprc(np.array([5, 1, 4, 2, 3.0]), truth) == pytest.approx(1.0)
    # ranking: 1(pos) 0 0 1(pos) ...: precisions at the positives 1/1 and 2/4 -> AP = 0.75
    assert auprc(np.array([5, 4, 3, 2, 1.0]), np.array([1, 0, 0, 1, 0])) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    truth = rng.random(20000) < 0.1
    assert auprc(rng.random(20000), truth) == pytest.approx(0.1, abs=0.01)  # random scores: the base rate


def test_mode_coverage_kl():
    uniform = np.repeat(np.arange(1000), 26)
    m = mode_coverage(uniform, 1000)
    assert m["modes_hit"] == 1000 and m["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    half = np.repeat(np.arange(500), 52)  # half the modes, equally: KL = log 2
    assert mode_coverage(half, 1000)["kl_to_uniform"] == pytest.approx(np.log(2))


def test_frechet_distance_matches_gaussian_closed_form():
    # Diagonal covariances commute: FID = ||mu1-mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5000, 16)) @ rng.standard_normal((16, 16))
    mu, cov = feature_statistics(f)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((2000, 32)), rng.standard_normal((2000, 32))
    same = kernel_inception_distance(f1, f2, subsets=5, subset_size=500)
    shifted = kernel_inception_distance(f1, f2 + 0.5, subsets=5, subset_size=500)
    assert abs(same) < 0.01 and shifted > 10 * abs(same) + 0.05


def test_gradient_norm_score_matches_analytic():
    x = torch.randn(7, 3)
    scores = anomaly_scores(lambda v: 0.5 * v.pow(2).sum(1) * 4.0, x, "grad_norm")  # grad = 4x
    assert np.allclose(scores, 4 * x.norm(dim=1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="score kind"):
        anomaly_scores(lambda v: v.sum(1), x, "entropy")


@pytest.mark.parametrize("seed", range(5))
def test_auprc_and_auroc_equal_scikit_learn_with_and_without_ties(seed):
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (a dev dependency) is not installed")
    rng = np.random.default_rng(seed)
    truth = rng.random(300) < 0.3
    for scores in (rng.random(300), rng.integers(0, 4, 300).astype(float)):  # untied, then heavily tied
        assert auprc(scores, truth) == pytest.approx(metrics.average_precision_score(truth, scores), abs=1e-12)
        assert auroc(scores, truth) == pytest.approx(metrics.roc_auc_score(truth, scores), abs=1e-12)


def test_tied_scores_do_not_depend_on_where_the_anomaly_sits():
    # All four tied: one threshold, precision 1/4 whatever the input order (input order used to give 1.0 or 0.25).
    scores = np.zeros(4)
    for position in range(4):
        truth = np.eye(4)[position]
        assert auprc(scores, truth) == pytest.approx(0.25) and auroc(scores, truth) == pytest.approx(0.5)
