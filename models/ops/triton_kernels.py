"""Triton kernels for the fused ops: the same numbers as ``TorchKernels`` (models/ops/kernels.py).

Imported only when a fused op runs on CUDA, or on a CPU under ``TRITON_INTERPRET=1`` (which Triton
reads when this module is imported). Kept to core ``tl`` operations that Triton has had since 2.x,
so the kernels build with the Triton of torch 2.11 (3.6) as well as of 2.13.

No kernel takes a Python float as a runtime argument: compiled Triton types one as fp32, so an fp64
kernel would compute with a rounded slope or factor, while the interpreter passes the double
through (tests/test_fused_ops.py emulates the compiled typing). The slope and a float loss scale
are ``tl.constexpr`` values materialised in the accumulation dtype with ``tl.full`` (Triton 3.6
rounds a bare constexpr float operand to fp32 first), and the batch size is an integer divided
inside the kernel. No loop has a runtime bound (the interpreter of Triton < 3.7 cannot run one
under numpy 2.4).
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

from models.ops.precision import accumulation_dtype

BLOCK = 1024
# The squared-norm reduction: one partial sum per program, then one program adds at most
# MAX_PARTIALS of them in a fixed order (deterministic: no atomics). A program covers CHUNKS blocks
# when the input has more than BLOCK * MAX_PARTIALS elements (a penalty gradient rarely does).
MAX_PARTIALS = 1024


@triton.jit
def _bias_leaky_relu_kernel(
    x_ptr,
    b_ptr,
    y_ptr,
    n,
    inner,
    channels,
    SLOPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (offs // inner) % channels, mask=mask, other=0.0).to(ACC_DTYPE)
    out = tl.where(acc > 0, acc, acc * tl.full([], SLOPE, ACC_DTYPE))
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _leaky_relu_grad_kernel(
    dy_ptr, y_ptr, dx_ptr, n, SLOPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    dx = tl.where(y > 0, dy, dy * tl.full([], SLOPE, ACC_DTYPE))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _squared_norm_partial_kernel(
    g_ptr, partial_ptr, n, ACC_DTYPE: tl.constexpr, CHUNKS: tl.constexpr, BLOCK: tl.constexpr
):
    start = tl.program_id(0) * (CHUNKS * BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for c in range(CHUNKS):  # a constexpr bound: unrolled when compiled
        offs = start + c * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(ACC_DTYPE)
        acc += g * g
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _squared_norm_finish_kernel(
    partial_ptr,
    scale_ptr,
    out_ptr,
    num_partials,
    batch,
    HAS_SCALE: tl.constexpr,
    SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    offs = tl.arange(0, PARTIALS)
    total = tl.sum(tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0), axis=0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
    else:
        scale = tl.full([], SCALE, ACC_DTYPE)
    tl.store(out_ptr, total / (scale * scale) / batch)


@triton.jit
def _squared_norm_mean_grad_kernel(
    g_ptr,
    up_ptr,
    scale_ptr,
    dg_ptr,
    n,
    batch,
    HAS_SCALE: tl.constexpr,
    SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
    else:
        scale = tl.full([], SCALE, ACC_DTYPE)
    factor = tl.load(up_ptr).to(ACC_DTYPE) * 2 / batch / (scale * scale)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(dg_ptr + offs, (g * factor).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, block: int) -> tuple[int]:
    return (max(triton.cdiv(n, block), 1),)


def _acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _scale_args(scale: Tensor | float, like: Tensor) -> tuple[Tensor, bool, float]:
    """(the scale tensor or a placeholder pointer, whether it is read, the float scale as a constexpr)."""
    if isinstance(scale, Tensor):
        return scale.reshape(1), True, 1.0
    return like, False, float(scale)


def reduction_layout(n: int) -> tuple[int, int, int]:
    """(programs, blocks per program, PARTIALS): at most MAX_PARTIALS programs of CHUNKS blocks each,
    and the power of two the finishing program loads."""
    blocks = max(triton.cdiv(n, BLOCK), 1)
    chunks = triton.cdiv(blocks, MAX_PARTIALS)
    programs = triton.cdiv(blocks, chunks)
    return programs, chunks, triton.next_power_of_2(programs)


class TritonKernels:
    name = "triton"

    def bias_leaky_relu(self, x: Tensor, bias: Tensor | None, slope: float) -> Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        inner = x[0, 0].numel() if x.dim() > 2 else 1
        b = bias.contiguous() if bias is not None else x
        _bias_leaky_relu_kernel[_grid(n, BLOCK)](
            x, b, y, n, inner, x.shape[1], SLOPE=slope, HAS_BIAS=bias is not None, ACC_DTYPE=_acc(x.dtype), BLOCK=BLOCK
        )
        return y

    def leaky_relu_grad(self, dy: Tensor, y: Tensor, slope: float) -> Tensor:
        dy, y = dy.contiguous(), y.contiguous()
        dx = torch.empty_like(dy)
        n = dy.numel()
        _leaky_relu_grad_kernel[_grid(n, BLOCK)](dy, y, dx, n, SLOPE=slope, ACC_DTYPE=_acc(dy.dtype), BLOCK=BLOCK)
        return dx

    def squared_norm_mean(self, g: Tensor, scale: Tensor | float) -> Tensor:
        g = g.contiguous()
        acc = accumulation_dtype(g.dtype)
        programs, chunks, partials_pow2 = reduction_layout(g.numel())
        partials = torch.empty(programs, dtype=acc, device=g.device)
        _squared_norm_partial_kernel[(programs,)](
            g, partials, g.numel(), ACC_DTYPE=_acc(g.dtype), CHUNKS=chunks, BLOCK=BLOCK
        )
        out = torch.empty((), dtype=acc, device=g.device)
        scale_t, has_scale, scale_f = _scale_args(scale, g)
        _squared_norm_finish_kernel[(1,)](
            partials,
            scale_t,
            out,
            programs,
            g.shape[0],
            HAS_SCALE=has_scale,
            SCALE=scale_f,
            ACC_DTYPE=_acc(g.dtype),
            PARTIALS=partials_pow2,
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
            g.shape[0],
            HAS_SCALE=has_scale,
            SCALE=scale_f,
            ACC_DTYPE=_acc(g.dtype),
            BLOCK=BLOCK,
        )
        return dg


@functools.cache
def triton_kernels() -> TritonKernels:
    return TritonKernels()
