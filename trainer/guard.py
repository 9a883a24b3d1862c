"""The divergence guard: a metric that turns non-finite or passes its bound stops the window, and the
trainer rolls back to its last checkpoint with lower learning rates, a bounded number of times."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class Diverged(RuntimeError):
    """A metric went non-finite or past its bound (train.guard); ``nonfinite`` tells which."""

    def __init__(self, message: str, nonfinite: bool = False):
        super().__init__(message)
        self.nonfinite = nonfinite


@dataclass
class GuardConfig:
    """On a non-finite metric or one past its bound, roll back to the last checkpoint with every
    learning rate multiplied by ``lr_factor``, at most ``max_rollbacks`` times."""

    max_rollbacks: int = field(default=3, metadata={"range": "[0, 1000]"})  # 0: a diverging run stops at once
    lr_factor: float = field(default=0.5, metadata={"range": "(0, 1]"})
    # Bounds on |E(fake) - E(real)| and the penalty; 0 disables.
    max_abs_energy_gap: float = field(default=1e4, metadata={"range": "[0, inf)"})
    max_penalty: float = field(default=1e6, metadata={"range": "[0, inf)"})
    # Checked before every checkpoint, so that no checkpoint holds weights a rollback would flee:
    # every parameter finite and each network's parameter norm at most this (0: finiteness only).
    max_param_norm: float = field(default=1e5, metadata={"range": "[0, inf)"})


class DivergenceGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.rollbacks = 0

    def check(self, table: torch.Tensor, names: list[str], steps: list[int]) -> None:
        """Raises Diverged naming the first step and term that is non-finite or past its bound.
        ``table`` holds one row of metrics (columns ``names``) per step in ``steps``."""
        limits = torch.full((table.shape[1],), float("inf"), device=table.device)
        for name, bound in (("energy_gap", self.cfg.max_abs_energy_gap), ("penalty", self.cfg.max_penalty)):
            if bound > 0 and name in names:
                limits[names.index(name)] = bound
        bad = (~torch.isfinite(table) | (table.abs() > limits)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            value = table[row, col].item()
            what = (
                "non-finite" if not torch.isfinite(table[row, col]) else f"out-of-bound (|x| > {limits[col].item():g})"
            )
            nonfinite = not math.isfinite(value)
            raise Diverged(f"{what} {names[col]} = {value:.6g} at step {steps[row]}", nonfinite)

    def check_parameters(self, networks: dict[str, torch.nn.Module], step: int) -> None:
        """Raises Diverged when a network holds a non-finite parameter or its norm passes the bound."""
        norms = torch.stack(
            [torch.stack([p.detach().float().norm() for p in net.parameters()]).norm() for net in networks.values()]
        ).tolist()  # one host sync per checkpoint
        for name, norm in zip(networks, norms):
            if not math.isfinite(norm):
                raise Diverged(f"non-finite parameters in {name} at step {step}", nonfinite=True)
            if self.cfg.max_param_norm > 0 and norm > self.cfg.max_param_norm:
                raise Diverged(
                    f"out-of-bound parameters in {name} at step {step}: norm {norm:.4g} > {self.cfg.max_param_norm:g} "
                    "(train.guard.max_param_norm)"
                )

    def next_rollback(self, error: Diverged, newest: str | None) -> float:
        """The learning-rate factor for the next rollback to ``newest`` (the newest intact checkpoint),
        or Diverged when the guard gives up."""
        if self.rollbacks >= self.cfg.max_rollbacks or newest is None:
            reason = "no checkpoint to roll back to" if newest is None else f"{self.rollbacks} rollback(s) did not help"
            where = f" A restart resumes from the newest intact checkpoint, {newest}." if newest else ""
            raise Diverged(
                f"{error}; {reason}. Stopping.{where} Lower the learning rates or raise train.penalty_weight first."
            ) from None
        self.rollbacks += 1
        return self.cfg.lr_factor
