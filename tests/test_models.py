"""Every network variant builds for its data shapes and keeps the shapes the objective needs."""

import pytest
import torch

from models.config import ModelConfig
from models.factory import build_networks


@pytest.mark.parametrize(
    "arch, shape, z_dim",
    [
        ("mlp", (2,), 2),
        ("mlp", (118,), 32),
        ("mlp", (1, 28, 28), 16),
        ("conv", (1, 28, 28), 16),
        ("conv", (3, 28, 28), 16),
        ("conv", (3, 32, 32), 16),
    ],
)
def test_shapes(arch, shape, z_dim):
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch,
        z_dim=z_dim,
        hidden=[16, 16],
        generator_hidden=[16, 16],
        generator_tanh=len(shape) > 1,
        init_std=0.02 if arch == "conv" else 0.0,
    )
    nets = build_networks(cfg, shape)
    z = torch.randn(4, z_dim)
    x = nets.generator(z)
    assert x.shape == (4, *shape)
    assert nets.energy(x).shape == (4,) and nets.statistics(x, z).shape == (4,)
    if len(shape) > 1:  # images live in [-1, 1]
        assert x.abs().max() <= 1.0


def test_conv_rejects_sizes_it_has_no_architecture_for():
    with pytest.raises(ValueError, match="supported sizes: 28, 32"):
        build_networks(ModelConfig(arch="conv", z_dim=8), (3, 64, 64))
    with pytest.raises(ValueError, match="square"):
        build_networks(ModelConfig(arch="conv", z_dim=8), (784,))


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 32, 32)])
def test_conv_width_scales_every_layer_and_keeps_the_shapes(shape):
    paper = build_networks(ModelConfig(arch="conv", z_dim=8), shape)
    narrow = build_networks(ModelConfig(arch="conv", z_dim=8, conv_width=16), shape)
    z = torch.randn(4, 8)
    x = narrow.generator(z)
    assert x.shape == (4, *shape) and narrow.energy(x).shape == (4,)
    first_conv = next(m for m in narrow.energy.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.out_channels == 16
    # Every layer's channels are a quarter of the paper's, so the conv weights are about 1/16.
    for name in ("energy", "generator"):
        ratio = sum(p.numel() for p in getattr(narrow, name).parameters()) / sum(
            p.numel() for p in getattr(paper, name).parameters()
        )
        assert 1 / 20 < ratio < 1 / 8, (name, ratio)


def test_conv_width_must_be_positive():
    with pytest.raises(ValueError, match="model.conv_width"):
        ModelConfig(arch="conv", conv_width=0)
