"""Fused ops for the gradient penalty's double backward, each beside its eager reference.

- ``bias_leaky_relu`` (K1): bias + LeakyReLU in one kernel, differentiable at every order.
- ``conv2d_gradfix`` (K2): a conv2d whose every derivative order runs the native kernels.
- ``squared_norm_mean``: the penalty's per-sample squared norm and mean in one kernel each way.
``FusedOps`` says which of them the networks and the penalty use (``model.kernels``).
"""

from models.ops.bias_act import bias_leaky_relu
from models.ops.conv_gradfix import conv2d_gradfix, no_weight_gradients
from models.ops.kernels import TORCH_KERNELS, kernels_for, use_kernels
from models.ops.layers import EAGER, FUSED, FusedOps, conv_leaky_relu, linear_leaky_relu
from models.ops.penalty import squared_norm_mean

__all__ = [
    "EAGER",
    "FUSED",
    "FusedOps",
    "TORCH_KERNELS",
    "bias_leaky_relu",
    "conv2d_gradfix",
    "conv_leaky_relu",
    "kernels_for",
    "linear_leaky_relu",
    "no_weight_gradients",
    "squared_norm_mean",
    "use_kernels",
]
