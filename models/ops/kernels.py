"""The elementwise and reduction kernels behind the fused ops, in two interchangeable sets.

``TorchKernels`` is the reference: plain PyTorch, any device and dtype, full speed on a CPU.
``TritonKernels`` (models/ops/triton_kernels.py) computes the same numbers in one Triton kernel
each; it runs on CUDA, or on a CPU under ``TRITON_INTERPRET=1`` (about 150x slower: tests only).
The autograd Functions (bias_act.py, penalty.py) call whichever set ``kernels_for`` picks, so their
wiring is tested with gradcheck on the reference at full speed and the Triton kernels are tested
against the reference on their own.

Every kernel computes in fp32 (or fp64 for fp64 inputs) and stores in its output's dtype.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor

from models.ops.precision import accumulation_dtype


class Kernels(Protocol):
    name: str

    def bias_leaky_relu(self, x: Tensor, bias: Tensor | None, slope: float) -> Tensor:
        """y = leaky_relu(x + bias[channel]) with the channel on dim 1 of a contiguous x."""

    def leaky_relu_grad(self, dy: Tensor, y: Tensor, slope: float) -> Tensor:
        """dx = dy where y > 0, else dy * slope (the mask is the sign of the forward's output)."""

    def squared_norm_mean(self, g: Tensor, scale: Tensor | float) -> Tensor:
        """mean over dim 0 of ||g_i / scale||^2 over all other dims: a 0-dim fp32 (fp64) tensor."""

    def squared_norm_mean_grad(self, g: Tensor, upstream: Tensor, scale: Tensor | float) -> Tensor:
        """d/dg of upstream * squared_norm_mean(g, scale): 2 * upstream * g / (scale^2 * batch)."""


def channel_view(bias: Tensor, x: Tensor) -> Tensor:
    """``bias`` shaped to broadcast along dim 1 of ``x``."""
    return bias.view(1, -1, *([1] * (x.dim() - 2)))


class TorchKernels:
    name = "torch"

    def bias_leaky_relu(self, x: Tensor, bias: Tensor | None, slope: float) -> Tensor:
        acc = x.to(accumulation_dtype(x.dtype))
        if bias is not None:
            acc = acc + channel_view(bias, x)
        return torch.where(acc > 0, acc, acc * slope).to(x.dtype)

    def leaky_relu_grad(self, dy: Tensor, y: Tensor, slope: float) -> Tensor:
        return torch.where(y > 0, dy, dy * slope)

    def squared_norm_mean(self, g: Tensor, scale: Tensor | float) -> Tensor:
        acc = g.to(accumulation_dtype(g.dtype)) / scale
        return acc.pow(2).flatten(1).sum(1).mean()

    def squared_norm_mean_grad(self, g: Tensor, upstream: Tensor, scale: Tensor | float) -> Tensor:
        acc = g.to(accumulation_dtype(g.dtype))
        return (acc * (2.0 * upstream / (g.shape[0] * scale * scale))).to(g.dtype)


TORCH_KERNELS = TorchKernels()
_override: Kernels | None = None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_for(device: torch.device) -> Kernels:
    """Triton on CUDA (and on a CPU under TRITON_INTERPRET=1), else the PyTorch reference."""
    if _override is not None:
        return _override
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        from models.ops.triton_kernels import triton_kernels

        return triton_kernels()
    return TORCH_KERNELS


@contextmanager
def use_kernels(kernels: Kernels) -> Iterator[None]:
    """Every fused op inside the block uses ``kernels`` (tests, benches)."""
    global _override
    previous, _override = _override, kernels
    try:
        yield
    finally:
        _override = previous
