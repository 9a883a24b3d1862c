"""Builds E, G and T from a small typed config and the shape of one data sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from models.conv import ConvEnergy, ConvGenerator, ConvStatistics, init_normal
from models.entropy import VERAConfig, VERANoise
from models.mlp import MLPEnergy, MLPGenerator, MLPStatistics
from models.ops import EAGER, FusedOps

WIDTHS = {"range": "[1, 65536]", "length": "[1, 64]"}
# The keys only one architecture reads.
ARCH_ONLY_KEYS = {
    "hidden": "mlp",
    "generator_hidden": "mlp",
    "generator_batch_norm": "mlp",
    "generator_tanh": "mlp",
    "energy_negative_slope": "mlp",
    "conv_width": "conv",
}


@dataclass
class ModelConfig:
    arch: Literal["mlp", "conv"] = "mlp"  # mlp: any shape, flattened; conv: 28x28xC and 32x32x3 images
    z_dim: int = field(default=2, metadata={"range": "[1, 65536]"})
    # MLP widths of E and T, and of G: at least one layer each.
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512], metadata=WIDTHS)
    generator_hidden: list[int] = field(default_factory=lambda: [512, 512, 512], metadata=WIDTHS)
    generator_batch_norm: bool = False
    generator_tanh: bool = False  # mlp only: squash G's output to [-1, 1] (images)
    energy_negative_slope: float = field(default=0.2, metadata={"range": "[0, 1)"})  # E's and T's LeakyReLU
    # > 0: N(0, init_std) weights, zero biases (the authors used 0.02 for images)
    init_std: float = field(default=0.0, metadata={"range": "[0, inf)"})
    # conv only: first layer's channels, doubled per layer (the paper's 64; 16 for CPU runs)
    conv_width: int = field(default=64, metadata={"range": "[1, 4096]"})
    # E's and T's layers and the penalty: fused (Triton bias+LeakyReLU, gradfix convs, one-kernel penalty
    # reduction), eager (plain PyTorch), or auto (fused where the step is captured as a CUDA graph, eager
    # elsewhere: trainer/steps.py resolve_kernels says why). Same numbers, same weights.
    kernels: Literal["auto", "eager", "fused"] = "auto"

    @staticmethod
    def keys_of_another_arch(values: dict) -> list[str]:
        """The keys a configuration sets that the architecture it picks does not read (an error: a
        silently ignored width is a run that is not what its config says)."""
        arch = values.get("arch", "mlp")
        return sorted(k for k, only in ARCH_ONLY_KEYS.items() if k in values and only != arch)

    def __post_init__(self) -> None:
        if self.z_dim < 1:
            raise ValueError(f"model.z_dim must be >= 1, got {self.z_dim}")
        if self.conv_width < 1:
            raise ValueError(f"model.conv_width must be >= 1, got {self.conv_width}")


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
