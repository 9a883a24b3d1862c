"""The MEG objective: gradient penalty, per-sample norms, the JSD mutual-information bound."""

import math

import torch
from torch import nn

from models.objectives import (
    energy_loss,
    generator_loss,
    gradient_penalty,
    jsd_mutual_information,
    squared_grad_norm,
)


def test_penalty_matches_analytic_quadratic_energy():
    # E(x) = 1/2 x^T A x has grad E = A x, so the penalty is mean_i ||A x_i||^2.
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64)
    energies, penalty = gradient_penalty(lambda v: 0.5 * ((v @ a) * v).sum(1), x)
    expected = (x @ a).pow(2).sum(1).mean()
    assert torch.allclose(penalty, expected, rtol=1e-12)
    assert torch.allclose(energies, 0.5 * ((x @ a) * x).sum(1))


def test_penalty_is_twice_differentiable():
    # The penalty's gradient w.r.t. A must match d/dA mean ||A x||^2 = 2 mean (A x) x^T.
    torch.manual_seed(1)
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 3, dtype=torch.float64)
    _, penalty = gradient_penalty(lambda v: 0.5 * ((v @ a.T) * v).sum(1) + 0.5 * ((v @ a) * v).sum(1) * 0, x)
    # E(x) = 1/2 x^T A^T x  => grad = 1/2 (A + A^T) x
    s = 0.5 * (a + a.T)
    expected = (x @ s.T).pow(2).sum(1).mean()
    (grad,) = torch.autograd.grad(penalty, a)
    (grad_expected,) = torch.autograd.grad(expected, a)
    assert torch.allclose(grad, grad_expected, rtol=1e-10)


def test_norm_is_per_sample_over_all_dimensions_of_images():
    # E(x) = sum of c * x over C, H, W: grad = c everywhere, so ||grad||^2 = sum c^2 over all dims,
    # NOT the per-pixel channel norm averaged over pixels that the authors' code computed.
    c = torch.arange(1.0, 1 + 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    norms = squared_grad_norm((x * c).flatten(1).sum(1), x)
    assert torch.allclose(norms, torch.full((2,), float(c.pow(2).sum()), dtype=torch.float64))
    per_pixel_mean = c.pow(2).sum(0).mean()  # the authors' mistaken variant: 16x smaller here
    assert not torch.allclose(norms[0], per_pixel_mean)


def test_penalty_scaling_recipe_is_exact():
    # fp16 recipe: scale the output before autograd.grad, unscale the gradient before the norm.
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = (x.pow(3)).sum(1)
    assert torch.allclose(squared_grad_norm(out, x, scale=1024.0), squared_grad_norm(out, x), rtol=1e-12)


def test_energy_loss_penalises_real_data_only():
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    fn = lambda v: energy(v).squeeze(1)  # noqa: E731
    real, fake = torch.randn(32, 2), 3 + torch.randn(32, 2)
    loss, m = energy_loss(fn, real, fake, penalty_weight=0.5)
    _, penalty_real = gradient_penalty(fn, real)
    assert torch.allclose(m["penalty"], penalty_real)
    expected = fn(real).mean() - fn(fake).mean() + 0.5 * penalty_real
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(m["energy_gap"], fn(fake).mean() - fn(real).mean(), atol=1e-6)


def _train_mi(rho: float, steps: int = 300) -> float:
    """Trains T on correlated Gaussians (corr = rho) and returns the final JSD bound estimate."""
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    stat = lambda x, z: t(torch.cat([x, z], 1)).squeeze(1)  # noqa: E731
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    for _ in range(steps):
        z = torch.randn(256, 1)
        x = rho * z + math.sqrt(1 - rho**2) * torch.randn(256, 1)
        loss = -jsd_mutual_information(stat, x, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = torch.randn(4096, 1)
        x = rho * z + math.sqrt(1 - rho**2) * torch.randn(4096, 1)
        return jsd_mutual_information(stat, x, z).item()


def test_mi_bound_rises_with_dependence():
    estimates = [_train_mi(rho) for rho in (0.0, 0.5, 0.9, 0.99)]
    # Independent: the JSD bound's optimum is -2 log 2 (T cannot tell pairs from shuffles).
    assert abs(estimates[0] + 2 * math.log(2)) < 0.05
    assert all(a < b for a, b in zip(estimates, estimates[1:])), estimates
    assert estimates[-1] > -0.6


def test_sample_spread_is_zero_for_a_collapsed_generator():
    torch.manual_seed(0)
    z = torch.randn(64, 4)
    statistics = lambda x, z: x.flatten(1).sum(1) * 0 + z.sum(1)  # noqa: E731
    energy = lambda x: x.flatten(1).sum(1)  # noqa: E731
    collapsed = torch.full((64, 3, 8, 8), 0.7)
    diverse = 0.5 * torch.randn(64, 3, 8, 8)
    _, collapsed_metrics = generator_loss(energy, statistics, collapsed, z)
    _, diverse_metrics = generator_loss(energy, statistics, diverse, z)
    assert collapsed_metrics["sample_spread"].item() == 0.0
    assert abs(diverse_metrics["sample_spread"].item() - 0.5) < 0.05


def test_fused_penalty_unscales_the_fp16_loss_scale_as_the_eager_one_does():
    # Under fp16 the inner gradient is taken of scale * E; both penalties divide the scale back out, so
    # the penalty and its gradient into E's parameters are those of the unscaled run.
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    fn = lambda v: energy(v).squeeze(1)  # noqa: E731
    x = torch.randn(8, 3, dtype=torch.float64)
    weights = list(energy.parameters())[:-1]  # the output bias takes no part in grad_x E
    _, reference = gradient_penalty(fn, x)
    expected = torch.autograd.grad(reference, weights)
    for fused in (False, True):
        _, penalty = gradient_penalty(fn, x, scale=1024.0, fused=fused)
        torch.testing.assert_close(penalty, reference, rtol=1e-12, atol=0)
        for got, want in zip(torch.autograd.grad(penalty, weights), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_generator_loss_weighs_the_mi_bound_by_the_entropy_weight():
    torch.manual_seed(0)
    t = nn.Linear(4, 1)
    statistics = lambda x, z: t(torch.cat([x, z], 1)).squeeze(1)  # noqa: E731
    energy = lambda x: x.pow(2).sum(1)  # noqa: E731
    x, z, perm = torch.randn(16, 2), torch.randn(16, 2), torch.randperm(16)
    mi = jsd_mutual_information(statistics, x, z, perm)
    for weight in (1.0, 0.03):
        loss, m = generator_loss(energy, statistics, x, z, entropy_weight=weight, perm=perm)
        torch.testing.assert_close(m["mi_estimate"], mi.detach())
        torch.testing.assert_close(loss, energy(x).mean() - weight * mi)
