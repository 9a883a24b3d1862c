"""Long jobs say how far they are: count / total and an ETA at intervals, silence for short ones."""

import io

import numpy as np
import pytest
import torch

from models.classifier import classify_stacked
from models.config import MALAConfig
from trainer.classifier import train_classifier
from trainer.evaluation import stackedmnist
from trainer.evaluation.sampling import generate
from trainer.fid import InceptionFeatures
from trainer.progress import Progress, format_duration
from trainer.scores import anomaly_scores, mode_coverage


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_at_intervals_with_count_total_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("work", 10, "items", every_s=2.5, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 1.0  # one item a second
        progress.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "work: 3/10 items (30%) | 1 items/s | ETA 0:00:07"
    assert [line.split(":")[1].split()[0] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert lines[-1] == "work: 10/10 items done in 0:00:10"


def test_a_short_job_prints_nothing():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("work", 5, every_s=10, stream=out, clock=clock)
    for _ in range(5):
        clock.now += 1.0
        progress.advance()
    assert out.getvalue() == ""


def test_format_duration():
    assert format_duration(3725.9) == "1:02:05" and format_duration(float("nan")) == "?"


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("MEG_PROGRESS_EVERY_S", "0")


def _progress_lines(text: str, what: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(what)]


def test_the_classifier_prints_its_steps(every_update, capsys):
    x, y = torch.randn(300, 1, 28, 28), torch.randint(0, 10, (300,))
    train_classifier(x, y, epochs=2, batch_size=64, log=lambda _: None)
    lines = _progress_lines(capsys.readouterr().out, "classifier training:")
    assert lines[0].startswith("classifier training: 1/6 steps") and "ETA " in lines[0]  # 255 // 64 = 3 a epoch
    assert lines[-1].startswith("classifier training: 6/6 steps done in")


def test_inception_features_print_their_images(every_update, capsys):
    features = object.__new__(InceptionFeatures)  # the network replaced by a stand-in of its output shape
    features.model, features.device, features.batch_size = lambda x: torch.zeros(len(x), 2048), torch.device("cpu"), 4
    features(torch.zeros(10, 3, 8, 8), "FID statistics")
    lines = _progress_lines(capsys.readouterr().out, "FID statistics:")
    assert [line.split()[2] for line in lines] == ["4/10", "8/10", "10/10"]


def test_anomaly_scores_print_their_records(every_update, capsys):
    energy = torch.nn.Linear(3, 1)
    scores = anomaly_scores(lambda x: energy(x).squeeze(1), torch.randn(250, 3), "grad_norm", batch_size=100)
    assert scores.shape == (250,) and np.isfinite(scores).all()
    lines = _progress_lines(capsys.readouterr().out, "anomaly scores (grad_norm):")
    assert [line.split()[3] for line in lines] == ["100/250", "200/250", "250/250"]


def test_stackedmnist_classification_prints_its_samples_and_scores_as_one_batch(every_update, capsys, monkeypatch):
    monkeypatch.setattr(stackedmnist, "CLASSIFY_CHUNK", 20)
    evaluator = stackedmnist.StackedMNISTEvaluator(None, stackedmnist.StackedMNISTEvalConfig(), None)
    torch.manual_seed(0)
    evaluator._classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))  # a stand-in
    samples = torch.randn(50, 3, 28, 28)
    result = evaluator.score_samples(samples)
    with torch.no_grad():
        assert result == mode_coverage(classify_stacked(evaluator._classifier, samples).numpy(), 1000)
    lines = _progress_lines(capsys.readouterr().out, "classifying samples:")
    assert [line.split()[2] for line in lines] == ["20/50", "40/50", "50/50"]


def test_plain_generation_prints_its_samples(every_update, capsys):
    generator = torch.nn.Linear(2, 2)
    plain, refined, _ = generate(None, generator, 25, 2, MALAConfig(steps=0), batch_size=10)
    assert plain.shape == (25, 2) and refined is None
    lines = _progress_lines(capsys.readouterr().out, "generating G(z):")
    assert [line.split()[2] for line in lines] == ["10/25", "20/25", "25/25"]
