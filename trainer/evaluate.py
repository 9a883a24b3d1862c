"""Evaluation during and after training: sample quality metrics, with and without latent MALA.

Toy 2D data: modes covered and the high-quality share (3-sigma rule), a scatter over the data and
the learned energy landscape. Images: a PNG grid of samples. Results go to ``eval/`` in the run
folder as JSON, one file per evaluated step plus ``latest.json``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from data_pipeline.shards import Manifest
from data_pipeline.toy import TOY_SPECS, ToySpec, mode_metrics, sample_toy
from models import latent_mala
from trainer.config import MALAConfig, RunConfig
from trainer.plots import energy_landscape, image_grid, scatter_2d


def generate(energy, generator, num: int, z_dim: int, mala: MALAConfig) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Plain samples G(z), MALA-refined samples (None when mala.steps == 0) and the acceptance rate."""
    device = next(generator.parameters()).device
    z = torch.randn(num, z_dim, device=device)
    with torch.no_grad():
        plain = generator(z).float()
    if mala.steps == 0:
        return plain, None, float("nan")
    result = latent_mala(energy, generator, z, mala.steps, mala.step_size, mala.temperature)
    return plain, result.x.float(), result.acceptance_rate


class Evaluator:
    def __init__(self, cfg: RunConfig, manifest: Manifest):
        self.cfg = cfg
        self.out_dir = os.path.join(cfg.output_dir, "eval")
        self.is_2d = manifest.sample_shape == [2]
        self.spec: ToySpec | None = None
        self.data: np.ndarray | None = None
        toy_name = cfg.data.toy or manifest.name
        if self.is_2d and toy_name in TOY_SPECS:
            base = TOY_SPECS[toy_name]
            self.spec = ToySpec(base.name, base.centres, cfg.data.toy_std or base.std)
            self.data, _ = sample_toy(toy_name, 2000, seed=12345, std=self.spec.std)

    def __call__(self, step: int, energy, generator) -> dict[str, float]:
        os.makedirs(self.out_dir, exist_ok=True)
        e = self.cfg.eval
        plain, refined, acceptance = generate(energy, generator, e.num_samples, self.cfg.model.z_dim, e.mala)
        results: dict[str, float] = {}
        if self.spec is not None and self.spec.centres is not None:
            results.update(mode_metrics(plain.cpu().numpy(), self.spec))
            if refined is not None:
                results.update({f"mala_{k}": v for k, v in mode_metrics(refined.cpu().numpy(), self.spec).items()})
        if refined is not None:
            results["mala_acceptance_rate"] = acceptance
        if e.plots:
            self._plots(step, energy, plain, refined, results)
        record = {"step": step, **results}
        for name in (f"step_{step:08d}.json", "latest.json"):
            with open(os.path.join(self.out_dir, name), "w") as f:
                json.dump(record, f, indent=2)
        return results

    def _plots(self, step, energy, plain, refined, results) -> None:
        tag = f"step_{step:08d}"
        if self.is_2d:
            lim = float(np.abs(self.data).max() * 1.25) if self.data is not None else 2.5
            hq = results.get("high_quality_share")
            title = f"step {step}" + (f": {hq:.1%} high quality, {results['modes_with_20']} modes with >= 20" if hq is not None else "")
            scatter_2d(os.path.join(self.out_dir, f"samples_{tag}.png"), plain.cpu().numpy(), self.data, title, lim)
            if refined is not None:
                scatter_2d(os.path.join(self.out_dir, f"samples_mala_{tag}.png"), refined.cpu().numpy(), self.data,
                           f"step {step}, after latent MALA", lim)
            energy_landscape(os.path.join(self.out_dir, f"energy_{tag}.png"), energy, lim, f"learned energy, step {step}")
        elif plain.dim() == 4:
            image_grid(os.path.join(self.out_dir, f"samples_{tag}.png"), plain[:64])
            if refined is not None:
                image_grid(os.path.join(self.out_dir, f"samples_mala_{tag}.png"), refined[:64])
