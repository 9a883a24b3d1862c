"""What every evaluator shares: draw samples from G (plain and after latent MALA), score them the
experiment's way, draw pictures, and write ``eval/<tag>.json`` and ``eval/latest.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from models.mala import MALAConfig, latent_mala
from trainer.nofollow import make_dir, write_replacing
from trainer.progress import Progress


@dataclass
class EvalContext:
    """What an evaluator knows of the run besides its own config section."""

    sample_shape: list[int]
    z_dim: int
    dataset: str  # the manifest's name of the training data (e.g. "25gaussians")
    out_dir: str  # where the JSON and pictures go
    entropy_weight: float = 1.0  # the generator targets p ∝ exp(-E / entropy_weight)


@torch.no_grad()
def _generate_plain(generator, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([generator(chunk).float() for chunk in z.split(batch_size)])


def generate(
    energy, generator, num: int, z_dim: int, mala: MALAConfig, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Plain samples G(z), MALA-refined samples (None when mala.steps == 0) and the acceptance rate."""
    device = next(generator.parameters()).device
    z = torch.randn(num, z_dim, device=device)
    plain = _generate_plain(generator, z, batch_size)
    if mala.steps == 0:
        return plain, None, float("nan")
    refined, accepted = [], 0.0
    progress = Progress(f"latent MALA ({mala.steps} steps)", num, "samples")
    for chunk in z.split(batch_size):
        result = latent_mala(energy, generator, chunk, mala.steps, mala.step_size, mala.temperature)
        refined.append(result.x.float())
        accepted += float(result.acceptance_rate) * len(chunk)
        progress.advance(len(chunk))
    return plain, torch.cat(refined), accepted / num


class Evaluator:
    """Base: subclasses score samples (``score_samples``), the energy itself (``score_energy``), and
    may draw their own pictures (``plot``; the base draws image grids)."""

    kind = "samples"

    def __init__(self, eval_cfg, section, ctx: EvalContext):
        self.cfg, self.section, self.ctx = eval_cfg, section, ctx

    def score_energy(self, energy) -> dict[str, float]:
        return {}

    def score_samples(self, samples: torch.Tensor) -> dict[str, float]:
        return {}

    def plot(self, tag: str, step: int, energy, plain, refined, results: dict) -> None:
        from trainer.plots import image_grid  # matplotlib: imported when a picture is drawn

        if plain.dim() == 4:
            image_grid(os.path.join(self.ctx.out_dir, f"samples_{tag}.png"), plain[:64])
            if refined is not None:
                image_grid(os.path.join(self.ctx.out_dir, f"samples_mala_{tag}.png"), refined[:64])

    def has_result(self, step: int) -> bool:
        """Whether the evaluation at ``step`` finished (its JSON was written)."""
        return os.path.exists(os.path.join(self.ctx.out_dir, f"step_{step:08d}.json"))

    def __call__(self, step: int, energy, generator, tag: str | None = None) -> dict[str, float]:
        make_dir(self.ctx.out_dir)
        results = dict(self.score_energy(energy))
        plain, refined, acceptance = generate(energy, generator, self.cfg.num_samples, self.ctx.z_dim, self.cfg.mala)
        results.update(self.score_samples(plain))
        if refined is not None:
            results.update({f"mala_{k}": v for k, v in self.score_samples(refined).items()})
            results["mala_acceptance_rate"] = acceptance
        tag = tag or f"step_{step:08d}"
        if self.cfg.plots:
            self.plot(tag, step, energy, plain, refined, results)
        record = {"step": step, "kind": self.kind, **results}
        for name in (f"{tag}.json", "latest.json"):
            with write_replacing(os.path.join(self.ctx.out_dir, name)) as f:
                json.dump(record, f, indent=2)
        return results
