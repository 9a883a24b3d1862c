"""Fused bias + LeakyReLU whose backward is itself differentiable (the bias_act pattern).

Forward: y = leaky_relu(x + b) in one kernel, saving only y (the mask is its sign; with a positive
slope, y > 0 exactly where x + b > 0). Backward: dx = dy * mask through a second Function, so that
a backward under ``create_graph=True`` (the gradient penalty's inner gradient) records a node that
can be differentiated again. That node's backward is the same mask op for d(dy), and None for d(y):
LeakyReLU'' = 0, so no zero tensor is made and nothing flows back into the forward graph — where
native autograd's ``leaky_relu_backward`` derivative adds a ``zeros_like`` per layer.
"""

from __future__ import annotations

from torch import Tensor
from torch.autograd import Function

from models.ops.kernels import kernels_for


class _LeakyReLUGrad(Function):
    @staticmethod
    def forward(ctx, dy: Tensor, y: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(y)
        ctx.slope = slope
        return kernels_for(dy.device).leaky_relu_grad(dy, y, slope)

    @staticmethod
    def backward(ctx, ggx: Tensor):
        (y,) = ctx.saved_tensors
        return _LeakyReLUGrad.apply(ggx, y, ctx.slope), None, None


class _BiasLeakyReLU(Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, slope: float) -> Tensor:
        y = kernels_for(x.device).bias_leaky_relu(x, bias, slope)
        ctx.save_for_backward(y)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        # y.detach(): the mask is piecewise constant in y, so no gradient ever flows into it.
        dx = _LeakyReLUGrad.apply(dy, y.detach(), ctx.slope)
        db = None
        if ctx.needs_input_grad[1]:
            db = dx.sum([d for d in range(dx.dim()) if d != 1])
        return dx, db, None


def bias_leaky_relu(x: Tensor, bias: Tensor | None, negative_slope: float) -> Tensor:
    """leaky_relu(x + bias) with the bias along dim 1; any derivative order. Needs a slope > 0."""
    if negative_slope <= 0:
        raise ValueError(
            f"bias_leaky_relu needs a positive slope (the mask is read off y's sign), got {negative_slope}"
        )
    if bias is not None:
        bias = bias.to(x.dtype)  # under autocast the layer's output is low precision; match it
    return _BiasLeakyReLU.apply(x.contiguous(), bias, float(negative_slope))
