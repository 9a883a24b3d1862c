"""Metropolis-adjusted Langevin in the generator's latent space (method.md, "Latent-space MCMC").

Target: p(z) ∝ exp(-U(z)), U(z) = E(G(z)) / temperature + ||z||^2 / 2 (the N(0, I) prior).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MALAResult:
    z: Tensor
    x: Tensor
    acceptance_rate: Tensor  # 0-dim, on z's device: float() reads it (a host sync, so only when needed)


def latent_mala(
    energy: Callable[[Tensor], Tensor],
    generator: Callable[[Tensor], Tensor],
    z: Tensor,
    steps: int,
    step_size: float,
    temperature: float = 1.0,
) -> MALAResult:
    """Runs ``steps`` MALA transitions from ``z``; returns the final z, G(z) and the acceptance rate.

    Gradients are taken with respect to z only, so no network accumulates parameter gradients.
    """

    def potential(z_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_ = z_.detach().requires_grad_(True)
        x_ = generator(z_)
        u = energy(x_).float() / temperature + 0.5 * z_.pow(2).flatten(1).sum(1)
        (grad,) = torch.autograd.grad(u.sum(), z_)
        return u.detach(), grad.detach(), x_.detach()

    def log_proposal(to: Tensor, frm: Tensor, grad_frm: Tensor) -> Tensor:
        # log q(to | frm) up to a constant: a Gaussian with mean frm - a*grad and variance 2a.
        return -(to - frm + step_size * grad_frm).pow(2).flatten(1).sum(1) / (4 * step_size)

    u, grad, x = potential(z)
    z = z.detach()
    accepted = torch.zeros((), device=z.device)
    for _ in range(steps):
        proposal = z - step_size * grad + math.sqrt(2 * step_size) * torch.randn_like(z)
        u_new, grad_new, x_new = potential(proposal)
        log_accept = -u_new + u + log_proposal(z, proposal, grad_new) - log_proposal(proposal, z, grad)
        accept = torch.rand_like(u).log() < log_accept
        accepted += accept.float().sum()
        keep = accept.view(-1, *([1] * (z.dim() - 1)))
        z = torch.where(keep, proposal, z)
        x = torch.where(accept.view(-1, *([1] * (x.dim() - 1))), x_new, x)
        u = torch.where(accept, u_new, u)
        grad = torch.where(keep, grad_new, grad)
    rate = accepted / (steps * z.shape[0]) if steps else torch.ones((), device=z.device)
    return MALAResult(z=z, x=x, acceptance_rate=rate)
