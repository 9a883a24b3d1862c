"""An exponential moving average of the generator's weights (``train.generator_ema``), updated after
every generator step: evaluation and the sample tool read it in place of the raw generator.

Every rank holds the same generator after each step (DDP averages gradients; DeepSpeed ZeRO 0-2
keeps whole parameters on every rank), so every rank's average is the same and needs no
communication. The average is kept in fp32 (under DeepSpeed bf16/fp16 it follows the module's
low-precision weights, not the fp32 masters: gathering those every step would be a collective).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    """``module``: a plain fp32 copy of the generator, in eval mode, that never takes a gradient."""

    def __init__(self, generator: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(generator).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * weights; buffers (BatchNorm's statistics) are copied."""
        for ema, p in zip(self.module.parameters(), generator.parameters(), strict=True):
            ema.lerp_(p.detach().float(), 1.0 - self.decay)
        for ema, b in zip(self.module.buffers(), generator.buffers(), strict=True):
            ema.copy_(b.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
