"""Builds E, G and T from a small typed config and the shape of one data sample."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.config import ModelConfig, VERAConfig
from models.conv import ConvEnergy, ConvGenerator, ConvStatistics, init_normal
from models.entropy import VERANoise
from models.mlp import MLPEnergy, MLPGenerator, MLPStatistics
from models.ops import EAGER, FusedOps


@dataclass
class MEGNetworks:
    energy: nn.Module
    generator: nn.Module
    statistics: nn.Module


def build_networks(
    cfg: ModelConfig, sample_shape: tuple[int, ...], ops: FusedOps = EAGER, vera: VERAConfig | None = None
) -> MEGNetworks:
    """E, G, T for samples of ``sample_shape`` (e.g. (2,) for toy data, (3, 28, 28) for images).

    ``vera``: the VERA entropy estimator's settings when it is the run's; T's place then holds its
    learned noise and posterior scales (models/entropy.py, VERANoise) instead of a network.

    ``ops``: the fused ops E's and T's layers use (the trainer resolves ``cfg.kernels`` for its
    device); the parameters and their names are the same whatever it is."""
    if cfg.arch == "mlp":
        # Any sample shape: E and T flatten their input, G reshapes its output.
        dim = 1
        for s in sample_shape:
            dim *= s
        nets = MEGNetworks(
            energy=MLPEnergy(dim, cfg.hidden, cfg.energy_negative_slope, ops),
            generator=MLPGenerator(
                cfg.z_dim, cfg.generator_hidden, sample_shape, cfg.generator_batch_norm, cfg.generator_tanh
            ),
            statistics=MLPStatistics(dim, cfg.z_dim, cfg.hidden, cfg.energy_negative_slope, ops),
        )
    else:
        if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
            raise ValueError(f"the conv arch takes square (C, H, W) images, got shape {sample_shape}")
        channels, size = sample_shape[0], sample_shape[1]
        nets = MEGNetworks(
            energy=ConvEnergy(channels, size, cfg.conv_width, ops),
            generator=ConvGenerator(cfg.z_dim, channels, size, cfg.conv_width),
            statistics=ConvStatistics(channels, size, cfg.z_dim, cfg.conv_width, ops),
        )
    if cfg.init_std > 0:
        for net in (nets.energy, nets.generator, nets.statistics):
            init_normal(net, cfg.init_std)
    if vera is not None:
        nets.statistics = VERANoise(cfg.z_dim, vera)
    return nets
