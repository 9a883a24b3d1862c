"""StackedMNIST: a digit classifier labels each channel of every sample; modes hit and
KL(mode histogram || uniform) over 10^channels modes."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.evaluation.base import Evaluator


@dataclass
class StackedMNISTEvalConfig:
    classifier: str = "classifiers/mnist.pt"  # python -m trainer.classifier --data data/mnist-test --out ...


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

    def __init__(self, eval_cfg, section: StackedMNISTEvalConfig, ctx):
        super().__init__(eval_cfg, section, ctx)
        self._classifier = None

    def score_samples(self, samples) -> dict[str, float]:
        from models.classifier import classify_stacked
        from trainer.classifier import load_classifier
        from trainer.scores import mode_coverage

        if self._classifier is None:
            self._classifier = load_classifier(self.section.classifier).to(samples.device)
        modes = classify_stacked(self._classifier, samples).cpu().numpy()
        return mode_coverage(modes, 10 ** samples.shape[1])
