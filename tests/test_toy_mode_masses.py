"""bench/toy_mode_masses.py: G's mode shares beside exp(-E/T)'s mode masses, and the energy's tilt and barriers,
checked on an energy whose shape is known."""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from trainer.evaluation.toy import DensityReference, ToyEvalConfig, toy_reference

_spec = importlib.util.spec_from_file_location("toy_mode_masses", REPO_ROOT / "bench" / "toy_mode_masses.py")
toy_mode_masses = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_mode_masses)

STD, W = 0.01768, 0.03
TILT, WELL, WIDTH = (0.02, -0.01), 1.0, 0.05


class TiltedWells(torch.nn.Module):
    """E(x) = TILT · x + WELL · (1 - exp(-d^2 / (2 WIDTH^2))), d: the distance to the nearest centre."""

    def __init__(self, centres):
        super().__init__()
        self.register_buffer("centres", torch.as_tensor(centres, dtype=torch.float32))
        self.unused = torch.nn.Parameter(torch.zeros(()))  # energy_values reads the device off a parameter

    def forward(self, x):
        d2 = torch.cdist(x, self.centres).min(1).values.pow(2)
        return x @ torch.tensor(TILT) + WELL * (1 - torch.exp(-d2 / (2 * WIDTH**2)))


class ModePicker(torch.nn.Module):
    """G(z): the centre whose slot of the cumulative ``probs`` holds Phi(z_0)."""

    def __init__(self, centres, probs):
        super().__init__()
        self.centres = torch.as_tensor(centres, dtype=torch.float32)
        self.cumulative = torch.as_tensor(np.cumsum(probs) / np.sum(probs), dtype=torch.float32)

    def forward(self, z):
        index = torch.searchsorted(self.cumulative, torch.special.ndtr(z[:, 0]).contiguous())
        return self.centres[index.clamp(max=len(self.centres) - 1)]


def _anatomy(probs):
    spec, data = toy_reference("25gaussians", STD)
    density = DensityReference("25gaussians", spec, data, ToyEvalConfig(density_points=2000))
    energy = TiltedWells(spec.centres)
    torch.manual_seed(0)
    return spec, toy_mode_masses.mode_anatomy(energy, ModePicker(spec.centres, probs), density, 2, W, 5000)


def test_the_tilt_barriers_and_mode_masses_of_a_known_energy():
    spec, a = _anatomy(np.ones(25))
    assert np.allclose(a["tilt"], TILT, atol=1e-5) and a["tilt_residual_std"] < 1e-5
    half_gap = np.linalg.norm(spec.centres[0] - spec.centres[1]) / 2  # the grid's neighbours are 0.707 apart
    assert math.isclose(a["barrier_min"], a["barrier_max"], rel_tol=1e-4)
    assert math.isclose(a["barrier_mean"], WELL * (1 - math.exp(-(half_gap**2) / (2 * WIDTH**2))), rel_tol=1e-4)
    # Deep narrow wells: each mode's mass is its centre's Boltzmann factor, so the ratio is the tilt's.
    span = max(spec.centres @ np.array(TILT)) - min(spec.centres @ np.array(TILT))
    assert math.isclose(a["mass_ratio_tw"], math.exp(span / W), rel_tol=0.05)
    assert math.isclose(sum(m["mass_tw"] for m in a["modes"]), 1.0, rel_tol=1e-6)
    # A G that spreads evenly does not follow the masses; its shares are all near 1/25.
    assert a["share_ratio"] < 2 and abs(a["share_mass_log_correlation"]) < 0.5
    assert a["share_mass_tv"] > 0.2


def test_a_generator_that_samples_the_energys_masses_correlates_with_them():
    spec = toy_reference("25gaussians", STD)[0]
    boltzmann = np.exp(-(spec.centres @ np.array(TILT)) / W)
    _, a = _anatomy(boltzmann)
    assert a["share_mass_log_correlation"] > 0.9 and a["share_mass_tv"] < 0.05
    assert math.isclose(a["share_ratio"], a["mass_ratio_tw"], rel_tol=0.5)


def test_shares_equal_to_the_masses_agree_perfectly_however_many_decades_the_masses_span():
    spec = toy_reference("25gaussians", STD)[0]
    mass = np.exp(-(spec.centres @ np.array([0.1, -0.06])) / W)
    mass /= mass.sum()
    assert mass.max() / mass.min() > 1e4
    tv, log_correlation = toy_mode_masses.share_mass_agreement(mass, mass, 2500)
    assert tv == 0 and log_correlation == pytest.approx(1.0, abs=1e-12)
    assert np.corrcoef(np.log(mass), mass)[0, 1] < 0.9  # the old measure, share against log mass
    disjoint = np.eye(25)[0]
    assert toy_mode_masses.share_mass_agreement(disjoint, np.eye(25)[1], 2500)[0] == 1.0


@pytest.mark.slow
def test_the_tool_on_a_trained_run_prints_every_mode_and_refuses_a_run_without_modes(tmp_path):
    run_trainer(tiny_overrides(tmp_path, steps=10))
    out = tmp_path / "anatomy.json"
    cmd = [sys.executable, "bench/toy_mode_masses.py", "--run", str(tmp_path / "run"), "--json", str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("| (") for line in result.stdout.splitlines()) == 25
    written = json.loads(out.read_text())
    assert len(written["modes"]) == 25 and math.isclose(sum(m["g_share"] for m in written["modes"]), 1.0)

    swissroll = tmp_path / "swissroll"
    run_trainer(tiny_overrides(swissroll, steps=2), preset="toy_swissroll")
    cmd[3] = str(swissroll / "run")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "without modes" in result.stderr and "Traceback" not in result.stderr
