"""The divergence guard: a metric that turns non-finite or passes its bound stops the window, and the
trainer rolls back to its last checkpoint with lower learning rates, a bounded number of times."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Diverged(RuntimeError):
    """A metric went non-finite or past its bound (train.guard)."""


@dataclass
class GuardConfig:
    """On a non-finite metric or one past its bound, roll back to the last checkpoint with every
    learning rate multiplied by ``lr_factor``, at most ``max_rollbacks`` times."""

    max_rollbacks: int = 3  # 0 disables the guard: a diverging run stops at once
    lr_factor: float = 0.5
    max_abs_energy_gap: float = 1e4  # bounds on |E(fake) - E(real)| and the penalty; 0 disables
    max_penalty: float = 1e6


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
            raise Diverged(f"{what} {names[col]} = {value:.6g} at step {steps[row]}")

    def next_rollback(self, error: Diverged, checkpoint_folder: str, have_checkpoint: bool) -> float:
        """The learning-rate factor for the next rollback, or Diverged when the guard gives up."""
        if self.rollbacks >= self.cfg.max_rollbacks or not have_checkpoint:
            reason = (
                "no checkpoint to roll back to" if not have_checkpoint else f"{self.rollbacks} rollback(s) did not help"
            )
            raise Diverged(
                f"{error}; {reason}. Stopping: checkpoints are intact in {checkpoint_folder}. "
                "Lower the learning rates or raise train.penalty_weight."
            ) from None
        self.rollbacks += 1
        return self.cfg.lr_factor
