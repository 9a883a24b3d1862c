"""The MEG objective as small functions (method.md, "The three updates").

Energy step:    L_E = mean E(x_data) - mean E(G(z)) + lambda * mean_i ||grad_x E(x_data_i)||^2
Generator step: L_G = mean E(G(z)) - I_JSD(G(z); z), minimised by G and T together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

EnergyFn = Callable[[Tensor], Tensor]
StatisticsFn = Callable[[Tensor, Tensor], Tensor]


def squared_grad_norm(outputs: Tensor, inputs: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """Per-sample ||d outputs_i / d inputs_i||^2 over ALL input dimensions, differentiable.

    ``scale`` is the fp16 loss-scaling recipe: the output is multiplied before autograd.grad so
    that small gradients do not underflow, and the gradient is divided back before the norm.
    """
    (grad,) = torch.autograd.grad((outputs.sum() * scale), inputs, create_graph=True)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32)) / scale
    return grad.pow(2).flatten(1).sum(dim=1)


def gradient_penalty(energy: EnergyFn, x: Tensor, scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Energies of ``x`` and the zero-centred penalty mean_i ||grad_x E(x_i)||^2."""
    x = x.detach().requires_grad_(True)
    energies = energy(x)
    return energies, squared_grad_norm(energies, x, scale).mean()


def energy_loss(
    energy: EnergyFn,
    x_real: Tensor,
    x_fake: Tensor,
    penalty_weight: float,
    scale: float | Tensor = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_E with the penalty on the data only. Real and fake go through E in one forward pass."""
    n = x_real.shape[0]
    x_real = x_real.detach().requires_grad_(True)
    energies = energy(torch.cat([x_real, x_fake.detach()])).float()
    e_real, e_fake = energies[:n], energies[n:]
    penalty = squared_grad_norm(e_real, x_real, scale).mean()
    loss = e_real.mean() - e_fake.mean() + penalty_weight * penalty
    metrics = {
        "energy_loss": loss.detach(),
        "energy_real": e_real.mean().detach(),
        "energy_fake": e_fake.mean().detach(),
        "energy_gap": (e_fake.mean() - e_real.mean()).detach(),
        "penalty": penalty.detach(),
    }
    return loss, metrics


def jsd_mutual_information(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor | None = None) -> Tensor:
    """Deep InfoMax's Jensen-Shannon lower bound on I(x; z) from paired samples.

    Positives are the pairs (x_i, z_i); negatives pair x_i with z_perm(i), a random in-batch
    permutation. Both sets go through T in one forward pass.
    """
    n = x.shape[0]
    if perm is None:
        perm = torch.randperm(n, device=z.device)
    scores = statistics(torch.cat([x, x]), torch.cat([z, z[perm]])).float()
    positive, negative = scores[:n], scores[n:]
    return (-F.softplus(-positive)).mean() - F.softplus(negative).mean()


def generator_loss(
    energy: EnergyFn,
    statistics: StatisticsFn,
    x_fake: Tensor,
    z: Tensor,
    entropy_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_G = mean E(G(z)) - entropy_weight * I_JSD(G(z); z); G and T both descend it."""
    e_fake = energy(x_fake).float().mean()
    mi = jsd_mutual_information(statistics, x_fake, z)
    loss = e_fake - entropy_weight * mi
    # Per-dimension std of the samples across the batch, averaged: near 0 once G has collapsed to
    # one output, which the losses alone do not show (the MI estimate then sits at -2 ln 2).
    spread = x_fake.detach().float().flatten(1).std(dim=0).mean()
    return loss, {
        "generator_loss": loss.detach(),
        "generator_energy": e_fake.detach(),
        "mi_estimate": mi.detach(),
        "sample_spread": spread,
    }
