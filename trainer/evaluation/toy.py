"""2D toy data (25 Gaussians, 8 Gaussians, swiss roll): the VEEGAN/PacGAN mode protocol, with
scatter plots of the samples over the data and the model's density."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.toy import TOY_SPECS, ToySpec, mode_metrics, sample_toy
from trainer.evaluation.base import Evaluator


@dataclass
class ToyEvalConfig:
    # The modes' std for the 3-sigma quality rule (0: the data set's own).
    std: float = field(default=0.0, metadata={"range": "[0, inf)"})


def toy_reference(dataset: str, std: float) -> tuple[ToySpec | None, np.ndarray | None]:
    """The data set's modes (None when it has none, e.g. the swiss roll) and 2,000 points of it."""
    if dataset not in TOY_SPECS:
        return None, None
    base = TOY_SPECS[dataset]
    spec = ToySpec(base.name, base.centres, std or base.std)
    data, _ = sample_toy(dataset, 2000, seed=12345, std=spec.std)
    return (spec if spec.centres is not None else None), data


class ToyEvaluator(Evaluator):
    kind = "toy"

    def __init__(self, eval_cfg, section: ToyEvalConfig, ctx):
        super().__init__(eval_cfg, section, ctx)
        self.spec, self.data = toy_reference(ctx.dataset, section.std)

    def score_samples(self, samples) -> dict[str, float]:
        return mode_metrics(samples.cpu().numpy(), self.spec) if self.spec is not None else {}

    def plot(self, tag, step, energy, plain, refined, results) -> None:
        from trainer.plots import energy_landscape, scatter_2d  # matplotlib: imported when a picture is drawn

        out = self.ctx.out_dir
        lim = float(np.abs(self.data).max() * 1.25) if self.data is not None else float(plain.abs().max() * 1.1)
        for name, samples, prefix, label in (
            ("samples", plain, "", ""),
            ("samples_mala", refined, "mala_", ", latent MALA"),
        ):
            if samples is None:
                continue
            hq = results.get(f"{prefix}high_quality_share")
            title = f"step {step}{label}" + (
                f": {hq:.1%} high quality, {results[f'{prefix}modes_with_20']} modes with >= 20"
                if hq is not None
                else ""
            )
            scatter_2d(os.path.join(out, f"{name}_{tag}.png"), samples.cpu().numpy(), self.data, title, lim)
        energy_landscape(
            os.path.join(out, f"energy_{tag}.png"), energy, lim, f"learned energy, step {step}", self.ctx.entropy_weight
        )
