"""Triton kernels for the fused ops: the same numbers as ``TorchKernels`` (models/ops/kernels.py).

Imported only when a fused op runs on CUDA, or on a CPU under ``TRITON_INTERPRET=1`` (which Triton
reads when this module is imported). Kept to core ``tl`` operations that Triton has had since 2.x,
so the kernels build with the Triton of torch 2.11 as well as of 2.13.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as e:  # triton ships with CUDA builds of torch, not with the CPU wheel
    raise ImportError(
        "model.kernels=fused needs Triton (it comes with CUDA builds of torch; on a CPU: pip install triton, "
        "and set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    ) from e

from models.ops.kernels import accumulation_dtype

BLOCK = 1024
# The squared-norm reduction runs as one program, so that it is deterministic (no atomics) and one
# launch; its input is one gradient the size of a batch of samples, at most a few MB.
REDUCE_BLOCK = 4096


@triton.jit
def _bias_leaky_relu_kernel(
    x_ptr, b_ptr, y_ptr, n, inner, channels, slope, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (offs // inner) % channels, mask=mask, other=0.0).to(ACC_DTYPE)
    out = tl.where(acc > 0, acc, acc * slope)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _leaky_relu_grad_kernel(dy_ptr, y_ptr, dx_ptr, n, slope, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    dx = tl.where(y > 0, dy, dy * slope)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _squared_norm_mean_kernel(
    g_ptr, scale_ptr, out_ptr, n, inv_batch, HAS_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr
):
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(ACC_DTYPE)
        acc += g * g
    total = tl.sum(acc, axis=0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
        total = total / (scale * scale)
    tl.store(out_ptr, total * inv_batch)


@triton.jit
def _squared_norm_mean_grad_kernel(
    g_ptr,
    up_ptr,
    scale_ptr,
    dg_ptr,
    n,
    two_inv_batch,
    HAS_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    factor = tl.load(up_ptr).to(ACC_DTYPE) * two_inv_batch
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
        factor = factor / (scale * scale)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(dg_ptr + offs, (g * factor).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, block: int) -> tuple[int]:
    return (max(triton.cdiv(n, block), 1),)


def _acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _scale_args(scale: Tensor | float, like: Tensor) -> tuple[Tensor, bool, float]:
    """(scale tensor or a placeholder, whether it is used, the float scale folded into a constant)."""
    if isinstance(scale, Tensor):
        return scale.reshape(1), True, 1.0
    return like, False, float(scale)


class TritonKernels:
    name = "triton"

    def bias_leaky_relu(self, x: Tensor, bias: Tensor | None, slope: float) -> Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        inner = x[0, 0].numel() if x.dim() > 2 else 1
        b = bias.contiguous() if bias is not None else x
        _bias_leaky_relu_kernel[_grid(n, BLOCK)](
            x, b, y, n, inner, x.shape[1], slope, HAS_BIAS=bias is not None, ACC_DTYPE=_acc(x.dtype), BLOCK=BLOCK
        )
        return y

    def leaky_relu_grad(self, dy: Tensor, y: Tensor, slope: float) -> Tensor:
        dy, y = dy.contiguous(), y.contiguous()
        dx = torch.empty_like(dy)
        n = dy.numel()
        _leaky_relu_grad_kernel[_grid(n, BLOCK)](dy, y, dx, n, slope, ACC_DTYPE=_acc(dy.dtype), BLOCK=BLOCK)
        return dx

    def squared_norm_mean(self, g: Tensor, scale: Tensor | float) -> Tensor:
        g = g.contiguous()
        out = torch.empty((), dtype=accumulation_dtype(g.dtype), device=g.device)
        scale_t, has_scale, scale_f = _scale_args(scale, g)
        _squared_norm_mean_kernel[(1,)](
            g,
            scale_t,
            out,
            g.numel(),
            1.0 / (g.shape[0] * scale_f * scale_f),
            HAS_SCALE=has_scale,
            ACC_DTYPE=_acc(g.dtype),
            BLOCK=REDUCE_BLOCK,
        )
        return out

    def squared_norm_mean_grad(self, g: Tensor, upstream: Tensor, scale: Tensor | float) -> Tensor:
        g = g.contiguous()
        dg = torch.empty_like(g)
        n = g.numel()
        scale_t, has_scale, scale_f = _scale_args(scale, g)
        _squared_norm_mean_grad_kernel[_grid(n, BLOCK)](
            g,
            upstream.reshape(1),
            scale_t,
            dg,
            n,
            2.0 / (g.shape[0] * scale_f * scale_f),
            HAS_SCALE=has_scale,
            ACC_DTYPE=_acc(g.dtype),
            BLOCK=BLOCK,
        )
        return dg


@functools.cache
def triton_kernels() -> TritonKernels:
    return TritonKernels()
