"""Latent MALA targets p(z) ∝ exp(-E(G(z))/tau - ||z||^2/2) exactly (squared-norm corrections)."""

import torch

from models.mala import latent_mala


def test_mala_reproduces_known_gaussian():
    # G = identity, E(x) = 1/2 (x - mu)^T A (x - mu): the target is Gaussian with precision
    # P = A/tau + I and mean P^{-1} A mu / tau.
    torch.manual_seed(0)
    a = torch.tensor([[3.0, 1.2], [1.2, 2.0]], dtype=torch.float64)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    tau = 0.5
    precision = a / tau + torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    mean = cov @ (a @ mu) / tau

    def energy(x):
        d = x - mu
        return 0.5 * ((d @ a) * d).sum(1)

    z0 = torch.randn(4000, 2, dtype=torch.float64)
    result = latent_mala(energy, lambda z: z, z0, steps=400, step_size=0.05, temperature=tau)
    z = result.z
    sample_cov = torch.cov(z.T)
    assert torch.allclose(z.mean(0), mean, atol=0.03), (z.mean(0), mean)
    assert torch.allclose(sample_cov, cov, atol=0.015), (sample_cov, cov)
    assert 0.5 < result.acceptance_rate < 1.0


def test_mala_keeps_target_stationary_even_with_a_too_large_step():
    # Started exactly at the target, a chain with a far too large step must stay there: the
    # Metropolis correction rejects the bad proposals rather than drifting.
    torch.manual_seed(0)
    target_var = 1 / 101  # E = 50 ||x||^2 plus the N(0, I) prior
    z0 = torch.randn(4000, 2) * target_var**0.5
    result = latent_mala(lambda x: 50 * x.pow(2).sum(1), lambda z: z, z0, steps=50, step_size=0.02)
    assert result.acceptance_rate < 0.5
    assert torch.allclose(result.z.var(0), torch.full((2,), target_var), rtol=0.1), result.z.var(0)


def test_mala_zero_steps_returns_generator_output():
    z = torch.randn(5, 3)
    result = latent_mala(lambda x: x.sum(1), lambda v: 2 * v, z, steps=0, step_size=0.1)
    assert torch.equal(result.x, 2 * z)
