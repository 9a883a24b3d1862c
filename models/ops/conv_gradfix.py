"""A conv2d that stays cheap at every derivative order: the gradient penalty's double backward.

Native autograd differentiates a convolution's backward through ``_convolution_double_backward``:
its weight gradient becomes a transposed, generic convolution with stride and dilation swapped
(at stride 2, a dilated convolution whose kernel spans the output map), plus copies and slices.

A convolution y = B(x, w) is bilinear, and so are its two gradients:
    data gradient    dx = B_x^T(dy, w)
    weight gradient  dw = B_w^T(dy, x)
Each of the three is differentiated into the other two (see the backwards below), so every order
runs the native forward, data-gradient and weight-gradient kernels (``aten.convolution`` and
``aten.convolution_backward`` with output masks) and nothing else. Pure PyTorch: no CUDA source.

``no_weight_gradients()`` wraps the penalty's inner ``autograd.grad``: a custom Function's
``needs_input_grad`` is fixed when its forward runs, so without it the inner pass would compute
and record a weight gradient that the penalty throws away. (Native autograd skips it already.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import Function

aten = torch.ops.aten

# A plain module global, not a thread-local: on CUDA the autograd engine runs backwards on its own
# device threads, which a thread-local set by the caller would not reach.
_weight_gradients_disabled = False


@contextmanager
def no_weight_gradients() -> Iterator[None]:
    """Inside the block, gradfix convolutions compute no gradient for their weights."""
    global _weight_gradients_disabled
    previous = _weight_gradients_disabled
    _weight_gradients_disabled = True
    try:
        yield
    finally:
        _weight_gradients_disabled = previous


@dataclass(frozen=True)
class ConvSpec:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return aten.convolution(x, w, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups)

    def input_grad(self, dy: Tensor, w: Tensor, like_x: Tensor) -> Tensor:
        # convolution_backward takes the input for its shape and layout; with this mask it reads no values.
        mask = [True, False, False]
        return aten.convolution_backward(dy, like_x, w, None, *self._args(), mask)[0]

    def weight_grad(self, dy: Tensor, x: Tensor, like_w: Tensor) -> Tensor:
        mask = [False, True, False]
        return aten.convolution_backward(dy, x, like_w, None, *self._args(), mask)[1]

    def _args(self) -> tuple:
        return self.stride, self.padding, self.dilation, False, [0, 0], self.groups


class _Conv(Function):
    """y = B(x, w)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, spec: ConvSpec) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.spec = spec
        return spec.forward(x, w)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _ConvInputGrad.apply(dy, w, x.detach(), ctx.spec)
        if ctx.needs_input_grad[1] and not _weight_gradients_disabled:
            dw = _ConvWeightGrad.apply(dy, x, w.detach(), ctx.spec)
        return dx, dw, None


class _ConvInputGrad(Function):
    """dx = B_x^T(dy, w); ``like_x`` only gives dx its shape and layout."""

    @staticmethod
    def forward(ctx, dy: Tensor, w: Tensor, like_x: Tensor, spec: ConvSpec) -> Tensor:
        ctx.save_for_backward(dy, w, like_x)
        ctx.spec = spec
        return spec.input_grad(dy, w, like_x)

    @staticmethod
    def backward(ctx, ggx: Tensor):
        # <ggx, B_x^T(dy, w)> = <B(ggx, w), dy> = <B_w^T(dy, ggx), w>
        dy, w, like_x = ctx.saved_tensors
        d_dy = d_w = None
        if ctx.needs_input_grad[0]:
            d_dy = _Conv.apply(ggx, w, ctx.spec)
        if ctx.needs_input_grad[1]:
            d_w = _ConvWeightGrad.apply(dy, ggx, w.detach(), ctx.spec)
        return d_dy, d_w, None, None


class _ConvWeightGrad(Function):
    """dw = B_w^T(dy, x); ``like_w`` only gives dw its shape and layout."""

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, like_w: Tensor, spec: ConvSpec) -> Tensor:
        ctx.save_for_backward(dy, x, like_w)
        ctx.spec = spec
        return spec.weight_grad(dy, x, like_w)

    @staticmethod
    def backward(ctx, ggw: Tensor):
        # <ggw, B_w^T(dy, x)> = <B(x, ggw), dy> = <B_x^T(dy, ggw), x>
        dy, x, like_w = ctx.saved_tensors
        d_dy = d_x = None
        if ctx.needs_input_grad[0]:
            d_dy = _Conv.apply(x, ggw, ctx.spec)
        if ctx.needs_input_grad[1]:
            d_x = _ConvInputGrad.apply(dy, ggw, x.detach(), ctx.spec)
        return d_dy, d_x, None, None


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d_gradfix(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` with the same numbers, whose derivatives of every order use the native kernels.

    Under autocast, x and the weight are cast to the autocast dtype here (the casts are ordinary,
    differentiable ops), so that every order runs in one dtype: autocast does not reach backwards.
    """
    spec = ConvSpec(_pair(stride), _pair(padding), _pair(dilation), groups)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y = _Conv.apply(x.to(dtype), weight.to(dtype), spec)
    else:
        y = _Conv.apply(x, weight.to(x.dtype), spec)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    return y
