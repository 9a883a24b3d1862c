"""Linear/conv + LeakyReLU layers, eager or fused, with identical parameters and state-dict keys.

A fused layer is an ``nn.Linear``/``nn.Conv2d`` subclass whose forward runs the bias and the
activation as one fused op (and, for convs, the gradfix convolution); the LeakyReLU module that
followed it becomes an ``nn.Identity``. So a checkpoint written with one choice loads with the
other, and a run trained with fused kernels on a GPU is sampled with eager ones on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from models.ops.bias_act import bias_leaky_relu
from models.ops.conv_gradfix import conv2d_gradfix


@dataclass(frozen=True)
class FusedOps:
    """Which fused ops the networks and the penalty use (model.kernels resolves to one of these)."""

    bias_act: bool = False  # K1: bias + LeakyReLU in one kernel, twice differentiable without zeros
    gradfix_conv: bool = False  # K2: native data/weight-gradient kernels at every derivative order
    penalty: bool = False  # the penalty's squared norm and mean in one kernel each way

    def describe(self) -> str:
        names = [name for name, on in vars(self).items() if on]
        return "+".join(names) if names else "eager"


EAGER = FusedOps()
FUSED = FusedOps(bias_act=True, gradfix_conv=True, penalty=True)


class FusedLinearLeakyReLU(nn.Linear):
    def __init__(self, in_features: int, out_features: int, negative_slope: float):
        super().__init__(in_features, out_features)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return bias_leaky_relu(F.linear(x, self.weight), self.bias, self.negative_slope)


class FusedConv2dLeakyReLU(nn.Conv2d):
    """A Conv2d (gradfix when ``gradfix``) followed by a fused bias + LeakyReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        padding: int,
        negative_slope: float,
        bias_act: bool,
        gradfix: bool,
    ):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding)
        self.negative_slope, self.fused_bias_act, self.gradfix = negative_slope, bias_act, gradfix

    def forward(self, x: Tensor) -> Tensor:
        conv = conv2d_gradfix if self.gradfix else F.conv2d
        if not self.fused_bias_act:
            y = conv(x, self.weight, self.bias, self.stride, self.padding)
            return F.leaky_relu(y, self.negative_slope)
        return bias_leaky_relu(conv(x, self.weight, None, self.stride, self.padding), self.bias, self.negative_slope)


def linear_leaky_relu(cin: int, cout: int, negative_slope: float, ops: FusedOps) -> list[nn.Module]:
    """[Linear, LeakyReLU] as two modules (the second an Identity when fused): same keys either way."""
    if ops.bias_act:
        return [FusedLinearLeakyReLU(cin, cout, negative_slope), nn.Identity()]
    return [nn.Linear(cin, cout), nn.LeakyReLU(negative_slope)]


def conv_leaky_relu(
    cin: int, cout: int, kernel: int, stride: int, padding: int, negative_slope: float, ops: FusedOps
) -> list[nn.Module]:
    """[Conv2d, LeakyReLU] as two modules (the second an Identity when fused): same keys either way."""
    if ops.bias_act or ops.gradfix_conv:
        fused = FusedConv2dLeakyReLU(cin, cout, kernel, stride, padding, negative_slope, ops.bias_act, ops.gradfix_conv)
        return [fused, nn.Identity()]
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding), nn.LeakyReLU(negative_slope)]
