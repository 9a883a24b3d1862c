"""The MEG objective as small functions (method.md, "The three updates").

Energy step:    L_E = mean E(x_data) - mean E(G(z)) + lambda * mean_i ||grad_x E(x_data_i)||^2
                (with train.penalty_every = k, the penalty on every k-th energy step, weighted k * lambda)
Generator step: L_G = mean E(G(z)) - I_JSD(G(z); z), minimised by G and T together
                (other entropy estimators in models/entropy.py, train.entropy_estimator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.ops import no_weight_gradients, squared_norm_mean

EnergyFn = Callable[[Tensor], Tensor]
StatisticsFn = Callable[[Tensor, Tensor], Tensor]
EntropyFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, "Tensor | None"]]


def at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 (autocast) outputs to fp32 for the loss arithmetic; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def input_gradient(outputs: Tensor, inputs: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """d(scale * sum_i outputs_i) / d inputs, itself differentiable (the penalty's inner gradient).

    ``scale`` is the fp16 loss-scaling recipe: the output is multiplied before autograd.grad so
    that small gradients do not underflow; the caller divides it back out before the norm. Gradfix
    convolutions compute no weight gradient here: this gradient is taken w.r.t. the inputs only.
    """
    with no_weight_gradients():
        (grad,) = torch.autograd.grad(outputs.sum() * scale, inputs, create_graph=True)
    return grad


def squared_grad_norm(outputs: Tensor, inputs: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """Per-sample ||d outputs_i / d inputs_i||^2 over ALL input dimensions, differentiable."""
    grad = input_gradient(outputs, inputs, scale)
    return (at_least_fp32(grad) / scale).pow(2).flatten(1).sum(dim=1)


def gradient_penalty(
    energy: EnergyFn, x: Tensor, scale: float | Tensor = 1.0, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """Energies of ``x`` and the zero-centred penalty mean_i ||grad_x E(x_i)||^2.

    ``fused``: the squared norm and the mean run as one kernel each way (models/ops/penalty.py).
    """
    x = x.detach().requires_grad_(True)
    energies = at_least_fp32(energy(x))
    if fused:
        return energies, squared_norm_mean(input_gradient(energies, x, scale), scale)
    return energies, squared_grad_norm(energies, x, scale).mean()


def energy_loss(
    energy: EnergyFn,
    x_real: Tensor,
    x_fake: Tensor,
    penalty_weight: float,
    scale: float | Tensor = 1.0,
    penalty: bool = True,
    fused_penalty: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_E with the penalty on the data only; without it when ``penalty`` is False (lazy penalty).

    Real and fake go through E separately: in one forward on cat(real, fake), the penalty's inner
    gradient and its double backward would run over twice the rows, half of them carrying zero
    gradient (bench/bench_penalty.py measures the difference). Same numbers either way: E has no
    batch statistics.
    """
    if penalty:
        e_real, penalty_value = gradient_penalty(energy, x_real, scale, fused_penalty)
    else:
        e_real = at_least_fp32(energy(x_real.detach()))
        penalty_value = e_real.new_zeros(())
    e_fake = at_least_fp32(energy(x_fake.detach()))
    loss = e_real.mean() - e_fake.mean()
    if penalty:
        loss = loss + penalty_weight * penalty_value
    metrics = {
        "energy_loss": loss.detach(),
        "energy_real": e_real.mean().detach(),
        "energy_fake": e_fake.mean().detach(),
        "energy_gap": (e_fake.mean() - e_real.mean()).detach(),
        # On a step without the penalty (train.penalty_every > 1) its value is 0 and penalty_steps 0:
        # the metric window averages the penalty over the steps that computed it.
        "penalty": penalty_value.detach(),
        "penalty_steps": e_real.new_full((), float(penalty)),
    }
    return loss, metrics


def random_permutation(n: int, device: torch.device) -> Tensor:
    """A random permutation drawn on ``device`` (argsort of uniform keys: no host round trip)."""
    return torch.rand(n, device=device).argsort()


def jsd_mutual_information(statistics: StatisticsFn, x: Tensor, z: Tensor, perm: Tensor | None = None) -> Tensor:
    """Deep InfoMax's Jensen-Shannon lower bound on I(x; z) from paired samples.

    Positives are the pairs (x_i, z_i); negatives pair x_i with z_perm(i), a random in-batch
    permutation. Both sets go through T in one forward pass.
    """
    n = x.shape[0]
    if perm is None:
        perm = random_permutation(n, z.device)
    scores = statistics(torch.cat([x, x]), torch.cat([z, z[perm]])).float()
    positive, negative = scores[:n], scores[n:]
    return (-F.softplus(-positive)).mean() - F.softplus(negative).mean()


def generator_loss(
    energy: EnergyFn,
    statistics: StatisticsFn,
    x_fake: Tensor,
    z: Tensor,
    entropy_weight: float = 1.0,
    perm: Tensor | None = None,
    entropy: EntropyFn | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_G = mean E(G(z)) - entropy_weight * I_JSD(G(z); z); G and T both descend it.

    ``perm`` pairs the MI bound's negatives (drawn here when None). ``entropy``: another estimator of
    the entropy term (models/entropy.py), ``entropy(x_fake, z)`` -> (objective, estimate, extra loss
    or None): L_G = mean E(G(z)) - entropy_weight * objective (+ extra); None is MEG's JSD bound."""
    e_fake = energy(x_fake).float().mean()
    if entropy is None:
        mi = jsd_mutual_information(statistics, x_fake, z, perm)
        loss = e_fake - entropy_weight * mi
    else:
        objective, mi, extra = entropy(x_fake, z)
        loss = e_fake - entropy_weight * objective
        if extra is not None:  # VERA's posterior: its own loss, on its own parameters
            loss = loss + extra
        mi = mi.detach()
    # Per-dimension std of the samples across the batch, averaged: near 0 once G has collapsed to
    # one output, which the losses alone do not show (the MI estimate then sits at -2 ln 2).
    spread = x_fake.detach().float().flatten(1).std(dim=0).mean()
    return loss, {
        "generator_loss": loss.detach(),
        "generator_energy": e_fake.detach(),
        "mi_estimate": mi.detach(),
        "sample_spread": spread,
    }
