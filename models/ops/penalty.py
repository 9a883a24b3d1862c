"""The gradient penalty's reduction as one kernel each way: mean_i ||g_i / scale||^2.

Eager PyTorch runs it as a cast, a division, a square, a per-sample sum and a mean forward, and as
many kernels backward. Here the forward is one deterministic reduction and the backward one
elementwise kernel (2 * upstream * g / (scale^2 * batch), stored in g's dtype). The penalty is
itself a first derivative of E, and the training step needs its first derivative only (the
double backward); a third derivative of E through it raises instead of returning wrong numbers.
"""

from __future__ import annotations

from torch import Tensor
from torch.autograd import Function

from models.ops.kernels import kernels_for

THIRD_DERIVATIVE_ERROR = (
    "the fused gradient penalty is differentiable once (that is the penalty's double backward through E); "
    "a further derivative is not implemented. Use model.kernels=eager for higher-order derivatives."
)


class _SquaredNormMeanGrad(Function):
    @staticmethod
    def forward(ctx, g: Tensor, upstream: Tensor, scale: Tensor | float) -> Tensor:
        return kernels_for(g.device).squared_norm_mean_grad(g, upstream, scale)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(THIRD_DERIVATIVE_ERROR)


class _SquaredNormMean(Function):
    @staticmethod
    def forward(ctx, g: Tensor, scale: Tensor | float) -> Tensor:
        ctx.save_for_backward(g)
        ctx.scale = scale
        return kernels_for(g.device).squared_norm_mean(g, scale)

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (g,) = ctx.saved_tensors
        return _SquaredNormMeanGrad.apply(g, upstream, ctx.scale), None


def squared_norm_mean(g: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """mean_i ||g_i / scale||^2 over every dimension but the first, in fp32 (fp64 for fp64 g).

    ``scale`` is the fp16 loss scale the gradient was computed under (a float or a 0-dim tensor,
    e.g. the GradScaler's own scale on the device: reading it as a float would sync the host)."""
    return _SquaredNormMean.apply(g, scale)
