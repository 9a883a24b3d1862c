"""The divergence guard: a metric that turns non-finite or passes its bound stops the window, and the
trainer rolls back to its last checkpoint with lower learning rates, a bounded number of times. When
a rollback meets the same failure at the same step, the checkpoint itself is the likely cause: the
next rollback goes one checkpoint further back (down to step 0), and the advice says so."""

from __future__ import annotations

import math

import torch

from trainer.checkpoint import FLED_SUFFIX, checkpoint_step
from trainer.config import GuardConfig


class Diverged(RuntimeError):
    """A metric went non-finite or past its bound (train.guard); ``nonfinite`` tells which."""

    def __init__(self, message: str, nonfinite: bool = False, step: int | None = None, term: str = ""):
        super().__init__(message)
        self.nonfinite, self.step, self.term = nonfinite, step, term


class DivergenceGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.rollbacks = 0
        self.last_failure: tuple[int | None, str] | None = None
        self.fled: list[str] = []  # checkpoints the same failure came back from, newest first
        self.repeated_from_start = False  # ... and from step 0 too (never fled: see flee_repeated)

    def flee_repeated(self, error: Diverged, loaded: str | None) -> bool:
        """Whether ``error`` is the failure the last rollback met again (same step, same term) from the
        checkpoint ``loaded``, at lowered learning rates: then that checkpoint is fled (the trainer sets
        it aside, so that neither the next rollback nor a restart takes it). With lr_factor 1 a repeat
        tells nothing. Step 0 is never fled: the initial networks hold no exploding weights (a failure at
        their first steps comes back at a learning rate still too high), and they are the last way back."""
        failure = (error.step, error.term)
        again = failure == self.last_failure and error.step is not None and loaded is not None
        again = again and self.cfg.lr_factor < 1
        self.last_failure = failure
        if again and checkpoint_step(loaded) == 0:
            self.repeated_from_start = True
            return False
        if again:
            self.fled.append(loaded)
        return again

    def rolled_back(self, step: int, lr_scale: float) -> str:
        n, limit = self.rollbacks, self.cfg.max_rollbacks
        return f"rolled back to step {step} with learning rates x{lr_scale:g} (rollback {n}/{limit})"

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
            raise Diverged(f"{what} {names[col]} = {value:.6g} at step {steps[row]}", nonfinite, steps[row], names[col])

    def check_parameters(self, networks: dict[str, torch.nn.Module], step: int) -> None:
        """Raises Diverged when a network holds a non-finite parameter or its norm passes the bound."""
        norms = torch.stack(
            [torch.stack([_norm(p) for p in net.parameters()]).norm() for net in networks.values()]
        ).tolist()  # one host sync per checkpoint
        for name, norm in zip(networks, norms):
            if not math.isfinite(norm):
                raise Diverged(f"non-finite parameters in {name} at step {step}", True, step, f"{name} parameters")
            if self.cfg.max_param_norm > 0 and norm > self.cfg.max_param_norm:
                raise Diverged(
                    f"out-of-bound parameters in {name} at step {step}: norm {norm:.4g} > {self.cfg.max_param_norm:g} "
                    "(train.guard.max_param_norm)",
                    step=step,
                    term=f"{name} parameters",
                )

    def next_rollback(self, error: Diverged, newest: str | None) -> float:
        """The learning-rate factor for the next rollback to ``newest`` (the newest intact checkpoint
        not fled), or Diverged when the guard gives up."""
        if self.rollbacks >= self.cfg.max_rollbacks or newest is None:
            raise self.give_up(error, newest) from None
        self.rollbacks += 1
        return self.cfg.lr_factor

    def give_up(self, error: Diverged, newest: str | None) -> Diverged:
        """The final error, with advice that matches the cause."""
        reason = "no checkpoint to roll back to" if newest is None else f"{self.rollbacks} rollback(s) did not help"
        if not self.fled:
            where = f" A restart resumes from the newest intact checkpoint, {newest}." if newest else ""
            return Diverged(
                f"{error}; {reason}. Stopping.{where} Lower the learning rates or raise train.penalty_weight first."
            )
        fled = ", ".join(self.fled)
        advice = (
            f"The weights diverge from checkpoint {self.fled[0]} at the next step regardless of the learning rate: "
            "it holds weights that explode, not a learning rate too high; it is kept as "
            f"{self.fled[0]}{FLED_SUFFIX}, where no restart takes it. A restart resumes from the newest intact "
            "checkpoint."
        )
        if self.repeated_from_start:
            advice = (
                f"The same failure came back at step {error.step} from every checkpoint tried ({fled}, and step 0) "
                "at lowered learning rates: its cause is likely the data or the model at that step, not a "
                "checkpoint (check the data read there, or raise train.penalty_weight). The checkpoints are kept "
                f"as step_N{FLED_SUFFIX}: rename them back to step_N to resume from one."
            )
        return Diverged(f"{error}; {reason}. Stopping. {advice}", error.nonfinite, error.step, error.term)


def _norm(p: torch.Tensor) -> torch.Tensor:
    # A parameter sharded by train.engine=fsdp: its norm is a DTensor, made whole by a collective
    # (every rank checks at every checkpoint).
    norm = p.detach().float().norm()
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
