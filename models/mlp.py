"""MLP variants of E, G and T for toy 2D and tabular data (method.md, "Architectures")."""

from __future__ import annotations

import torch
from torch import nn

from models.ops import EAGER, FusedOps, linear_leaky_relu


def leaky_mlp(in_dim: int, hidden: list[int], out_dim: int, negative_slope: float, ops: FusedOps) -> nn.Sequential:
    """Linear + LeakyReLU layers and a linear output (E and T): eager or fused, same state-dict keys."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += linear_leaky_relu(width, h, negative_slope, ops)
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class MLPEnergy(nn.Module):
    """E(x) -> one scalar energy per sample; low energy means data."""

    def __init__(self, data_dim: int, hidden: list[int], negative_slope: float = 0.2, ops: FusedOps = EAGER):
        super().__init__()
        self.net = leaky_mlp(data_dim, hidden, 1, negative_slope, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1)


class MLPGenerator(nn.Module):
    """G(z) -> x of ``sample_shape``, with optional batch norm between hidden layers and an
    optional tanh output (for data scaled to [-1, 1], such as images)."""

    def __init__(
        self, z_dim: int, hidden: list[int], sample_shape: tuple[int, ...], batch_norm: bool = False, tanh: bool = False
    ):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        data_dim = 1
        for s in self.sample_shape:
            data_dim *= s
        layers: list[nn.Module] = []
        width = z_dim
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=not batch_norm))  # a batch norm's shift is the bias
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            width = h
        layers.append(nn.Linear(width, data_dim))
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.sample_shape)


class MLPStatistics(nn.Module):
    """T(x, z): an MLP on the concatenation [x, z], one score per pair."""

    def __init__(
        self, data_dim: int, z_dim: int, hidden: list[int], negative_slope: float = 0.2, ops: FusedOps = EAGER
    ):
        super().__init__()
        self.net = leaky_mlp(data_dim + z_dim, hidden, 1, negative_slope, ops)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), z], dim=1)).squeeze(1)
