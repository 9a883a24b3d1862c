"""StackedMNIST: a digit classifier labels each channel of every sample; modes hit and
KL(mode histogram || uniform) over 10^channels modes."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.cli import ConfigError
from data_pipeline.config import PATH_FIELD
from trainer.evaluation.base import Evaluator

CLASSIFY_CHUNK = 2000  # samples between progress lines: 26,000 take minutes on a CPU


@dataclass
class StackedMNISTEvalConfig:
    # python -m trainer.classifier --data data/mnist-test --out ...
    classifier: str = field(default="classifiers/mnist.pt", metadata=PATH_FIELD)


class StackedMNISTEvaluator(Evaluator):
    kind = "stackedmnist"
    config = StackedMNISTEvalConfig

    @classmethod
    def requirements(cls, cfg) -> list[tuple[str, str, str]]:
        path = cfg.eval.stackedmnist.classifier
        make = (
            f"make it with: python -m trainer.classifier --data data/mnist-test --out {path} "
            "(the digits: python -m data_pipeline.convert mnist --images t10k-images-idx3-ubyte.gz --labels "
            "t10k-labels-idx1-ubyte.gz --out data/mnist-test)"
        )
        return [("eval.stackedmnist.classifier", path, make)]

    @classmethod
    def check(cls, cfg) -> None:
        from trainer.classifier import load_classifier

        load_classifier(cfg.eval.stackedmnist.classifier)  # small: a wrong file is told before any work

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        if len(sample_shape) != 3 or sample_shape[1:] != [28, 28]:
            raise ConfigError(
                f"eval.kind=stackedmnist classifies stacks of 28 x 28 digits, (channels, 28, 28); this data's "
                f"samples are {tuple(sample_shape)}: choose another eval.kind (samples draws pictures of images "
                "and 2-D points)"
            )

    def __init__(self, eval_cfg, section: StackedMNISTEvalConfig, ctx):
        super().__init__(eval_cfg, section, ctx)
        self._classifier = None

    def score_samples(self, samples) -> dict[str, float]:
        import torch

        from models.classifier import classify_stacked
        from trainer.classifier import load_classifier
        from trainer.progress import Progress
        from trainer.scores import mode_coverage

        if self._classifier is None:
            self._classifier = load_classifier(self.section.classifier).to(samples.device)
        progress = Progress("classifying samples", len(samples), "samples")
        modes = []
        with torch.no_grad():
            for chunk in samples.split(CLASSIFY_CHUNK):
                modes.append(classify_stacked(self._classifier, chunk).cpu())
                progress.advance(len(chunk))
        return mode_coverage(torch.cat(modes).numpy(), 10 ** samples.shape[1])
