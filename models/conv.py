"""Convolutional E, G and T for 28x28 images with n channels and for 32x32x3 images (method.md)."""

from __future__ import annotations

import torch
from torch import nn

from models.ops import EAGER, FusedOps, conv_leaky_relu, linear_leaky_relu


def energy_trunk(channels: int, size: int, width: int = 64, ops: FusedOps = EAGER) -> tuple[nn.Sequential, int]:
    """The convolutional feature extractor shared by E and T; returns (trunk, flat feature size).

    ``width`` is the first layer's channel count (the paper's 64); later layers double it, so the
    conv compute grows with its square (16: about 10x less per energy step on a CPU, bench_steps).
    """
    w = width
    if size == 28:
        # Four 5x5 stride-2 convs, LeakyReLU(0.2), no normalization: 28 -> 14 -> 7 -> 4 -> 2.
        widths = [channels, w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += conv_leaky_relu(cin, cout, 5, 2, 2, 0.2, ops)
        return nn.Sequential(*layers, nn.Flatten()), 8 * w * 2 * 2
    if size == 32:
        # Seven convs alternating 3x3 stride 1 and 4x4 stride 2, LeakyReLU(0.1): 32 -> 4.
        spec = [(w, 3, 1), (w, 4, 2), (2 * w, 3, 1), (2 * w, 4, 2), (4 * w, 3, 1), (4 * w, 4, 2), (8 * w, 3, 1)]
        layers = []
        cin = channels
        for cout, kernel, stride in spec:
            layers += conv_leaky_relu(cin, cout, kernel, stride, 1, 0.1, ops)
            cin = cout
        return nn.Sequential(*layers, nn.Flatten()), 8 * w * 4 * 4
    raise ValueError(f"no conv architecture for {size}x{size} images; supported sizes: 28, 32")


class ConvEnergy(nn.Module):
    def __init__(self, channels: int, size: int, width: int = 64, ops: FusedOps = EAGER):
        super().__init__()
        self.trunk, features = energy_trunk(channels, size, width, ops)
        self.head = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).squeeze(1)


class ConvGenerator(nn.Module):
    """DCGAN-style generator: Linear + BN + ReLU, stride-2 transposed convs, Tanh."""

    def __init__(self, z_dim: int, channels: int, size: int, width: int = 64):
        super().__init__()
        w = width
        if size == 28:
            # 2 -> 4 -> 7 -> 14 -> 28 with 5x5 kernels; output_padding picks the odd step to 7.
            base, kernel, padding = 2, 5, 2
            ups = [(8 * w, 4 * w, 1), (4 * w, 2 * w, 0), (2 * w, w, 1), (w, channels, 1)]
        elif size == 32:
            base, kernel, padding = 4, 4, 1
            ups = [(8 * w, 4 * w, 0), (4 * w, 2 * w, 0), (2 * w, w, 0)]
        else:
            raise ValueError(f"no conv generator for {size}x{size} images; supported sizes: 28, 32")
        self.base, self.base_channels = base, 8 * w
        # No bias before a batch norm: the norm's mean subtraction cancels it, so its gradient is
        # rounding noise that Adam would turn into lr-sized random steps (DCGAN's layers have none).
        self.project = nn.Sequential(
            nn.Linear(z_dim, base * base * 8 * w, bias=False), nn.BatchNorm1d(base * base * 8 * w), nn.ReLU()
        )
        layers: list[nn.Module] = []
        for i, (cin, cout, out_pad) in enumerate(ups):
            last = size == 28 and i == len(ups) - 1
            layers.append(
                nn.ConvTranspose2d(cin, cout, kernel, stride=2, padding=padding, output_padding=out_pad, bias=last)
            )
            if last:
                break
            layers += [nn.BatchNorm2d(cout), nn.ReLU()]
        if size == 32:
            layers.append(nn.Conv2d(w, channels, 3, padding=1))
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], self.base_channels, self.base, self.base)
        return self.net(h)


class ConvStatistics(nn.Module):
    """T(x, z) = MLP([Linear(trunk(x)) -> 128, z]) with hidden widths 256, 512."""

    def __init__(self, channels: int, size: int, z_dim: int, width: int = 64, ops: FusedOps = EAGER):
        super().__init__()
        self.trunk, features = energy_trunk(channels, size, width, ops)
        self.embed = nn.Linear(features, 128)
        self.head = nn.Sequential(
            *linear_leaky_relu(128 + z_dim, 256, 0.2, ops), *linear_leaky_relu(256, 512, 0.2, ops), nn.Linear(512, 1)
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.embed(self.trunk(x)), z], dim=1)).squeeze(1)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights and zero biases for conv and linear layers (the authors' image init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
