"""The energy as a density on 2D data: the quadrature's normaliser against known densities, its
convergence, and PacGAN's reverse KL of the mode histogram."""

import math

import numpy as np
import pytest
import torch

from data_pipeline.toy import TOY_SPECS, mode_metrics, sample_toy
from trainer.evaluation.toy import DensityReference, ToyEvalConfig, toy_reference

SPEC = TOY_SPECS["25gaussians"]


class MixtureEnergy(torch.nn.Module):
    """E(x) = -log p(x) of the 25-Gaussian mixture itself: exp(-E) is normalised, so Z_1 = 1."""

    def __init__(self):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.from_numpy(SPEC.centres).float(), requires_grad=False)

    def forward(self, x):
        sq = ((x[:, None, :].double() - self.centres.double()[None]) ** 2).sum(-1)
        var = SPEC.std**2
        log_p = torch.logsumexp(-sq / (2 * var), dim=1) - math.log(2 * math.pi * var * len(SPEC.centres))
        return -log_p


class ConstantEnergy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.zero = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.zero.expand(len(x))


def _reference(**section):
    spec, data = toy_reference("25gaussians", 0.0)
    return DensityReference("25gaussians", spec, data, ToyEvalConfig(density_points=5000, **section))


@pytest.fixture(scope="module")
def reference():
    return _reference()


def test_the_true_energy_scores_the_true_density(reference):
    r = reference.score(MixtureEnergy(), entropy_weight=0.03)
    assert r["density_nll_t1"] == pytest.approx(r["density_nll_true"], abs=0.01)
    assert r["density_nll_true"] < -1.5  # sharp modes: far below the box's uniform density
    assert r["density_best_t"] == pytest.approx(1.0, rel=0.13)  # the grid's neighbour of 1 (twenty per decade)
    assert r["density_nll_best"] <= r["density_nll_t1"] + 0.01
    assert r["density_nll_tw"] > r["density_nll_t1"] + 10  # T = 0.03 sharpens the modes far too much
    assert r["mode_mass_ratio"] < 1.05 and r["density_mass_3sigma"] == pytest.approx(0.989, abs=0.003)


def test_a_constant_energy_is_the_uniform_density_at_every_temperature(reference):
    r = reference.score(ConstantEnergy(), entropy_weight=0.03)
    assert reference.lim == 2.0 and r["density_nll_uniform"] == pytest.approx(math.log(16))
    for key in ("density_nll_tw", "density_nll_t1", "density_nll_best"):
        assert r[key] == pytest.approx(math.log(16), abs=1e-9)
    # Nearest-centre cells of equal area inside; the corner ones reach the box's edge: (0.94 / 0.71)^2.
    assert r["mode_mass_ratio"] == pytest.approx(((2 - 1.414 + 0.354) / 0.707) ** 2, rel=0.01)


# Two grids of 0.8M and 3.3M energies each: 8-25 s of CPU a case, so the slow tier.
@pytest.mark.slow
@pytest.mark.parametrize("energy", ["mixture", "mlp"])
def test_the_quadrature_has_converged(reference, energy):
    torch.manual_seed(0)
    if energy == "mixture":
        net = MixtureEnergy()
    else:  # a smooth random network, scaled so that exp(-E / 0.03) varies strongly over the box
        net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 1))
        net = torch.nn.Sequential(net, torch.nn.Flatten(0))
    fine = _reference(density_cell=SPEC.std / 8)  # twice as fine as the default
    coarse, finer = reference.score(net, 0.03), fine.score(net, 0.03)
    for key in ("density_nll_tw", "density_nll_t1", "density_nll_best"):
        assert coarse[key] == pytest.approx(finer[key], abs=0.01), key


def test_reverse_kl_of_the_mode_histogram():
    on_every_mode, _ = sample_toy("25gaussians", 2500, seed=0)
    assert mode_metrics(on_every_mode, SPEC)["mode_kl_reverse"] < 0.02  # sampling noise of 2,500 draws
    on_one_mode = np.tile(SPEC.centres[:1], (2500, 1))
    assert mode_metrics(on_one_mode, SPEC)["mode_kl_reverse"] == pytest.approx(math.log(25))
    nowhere = np.full((100, 2), 10.0)
    assert math.isnan(mode_metrics(nowhere, SPEC)["mode_kl_reverse"])
