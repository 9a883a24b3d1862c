"""Samples from G for an evaluation or the sample tool: plain, G(z), and after latent MALA."""

from __future__ import annotations

import torch

from models.config import MALAConfig
from models.mala import latent_mala
from trainer.progress import Progress


@torch.no_grad()
def _generate_plain(generator, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    progress, samples = Progress("generating G(z)", len(z), "samples"), []
    for chunk in z.split(batch_size):
        samples.append(generator(chunk).float())
        progress.advance(len(chunk))
    return torch.cat(samples)


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
