"""The MEG training loop: n energy steps, then one generator + statistics step, repeated.

Metrics stay on the device as detached tensors and are reduced across ranks once per
``log.every`` steps: each reduction is a sync point, so it is not done every step.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from data_pipeline.stream import ShardStream, StreamPosition, decode_samples
from models import MEGNetworks
from trainer.config import RunConfig
from trainer.distributed import Runtime, checkpoint_step, list_checkpoints
from trainer.metrics import MetricsLogger
from trainer.steps import build_steps

Evaluator = Callable[[int, nn.Module, nn.Module], dict[str, float]]


class Diverged(RuntimeError):
    """A metric went non-finite or past its bound (train.guard)."""


# A job that stopped because it was asked to (e.g. Slurm's warning signal before the time limit)
# exits with this code after checkpointing, so a wrapper script knows to requeue it.
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL


class Preempted(RuntimeError):
    pass


class TrainState:
    """What a checkpoint needs beyond networks, optimizers and RNGs: the step and the stream
    positions. Only the main process writes it, so it carries every rank's position (gathered just
    before saving): ranks' positions differ once a corrupt shard has ended one rank's epoch early,
    and each rank resumes from its own."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self.position = StreamPosition()
        self.rank_positions: list[dict[str, int]] = []  # filled by the trainer before each save
        self.lr_scale = 1.0  # lowered by each divergence rollback, and kept across resumes

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "position": self.position.state_dict(),
            "rank_positions": self.rank_positions or [self.position.state_dict()],
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        positions = state.get("rank_positions", [])
        # Another world size reshuffles the shards among ranks: every rank then takes rank 0's place.
        own = positions[self.rank] if len(positions) == self.world_size else state["position"]
        self.position.load_state_dict(own)
        self.lr_scale = float(state.get("lr_scale", 1.0))


class MEGTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        runtime: Runtime,
        nets: MEGNetworks,
        stream: ShardStream,
        logger: MetricsLogger,
        evaluator: Evaluator | None = None,
    ):
        self.cfg, self.runtime, self.stream, self.logger, self.evaluator = cfg, runtime, stream, logger, evaluator
        # Two updates: E alone, and G with T (they descend one loss with one optimizer).
        self.steps = build_steps(cfg, runtime, nets)
        self.energy, self.generator, self.statistics = self.steps.modules()
        self.state = TrainState(runtime.rank, runtime.world_size)
        runtime.register_for_checkpointing(self.state)
        self.checkpoint_dir = os.path.join(cfg.output_dir, "checkpoints")
        self._pending: list[torch.Tensor] = []
        self._metric_names: list[str] = []
        self._stop_signal: int | None = None
        self.data_wait_s = 0.0  # time blocked on the next batch since the last metric flush
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame) -> None:
        # Only a flag: the ranks agree on it at the next metric reduction, then checkpoint together.
        self._stop_signal = signum

    # -- the loop ---------------------------------------------------------------------------

    def resume_if_possible(self) -> int | None:
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if not (self.cfg.checkpoint.resume and checkpoints):
            return None
        self._load_checkpoint(checkpoints[-1])
        return checkpoint_step(checkpoints[-1])

    def _load_checkpoint(self, path: str) -> None:
        self.runtime.load_checkpoint(path)
        self.steps.after_checkpoint_load()

    def _batches(self) -> Iterator[torch.Tensor]:
        """Real batches forever, epoch after epoch, advancing the checkpointed position."""
        position = self.state.position
        while True:
            batches = iter(self.stream.epoch_batches(position))
            while True:
                # Time blocked waiting for data: the data-wait share of a step in the metrics.
                wait_start = time.perf_counter()
                batch = next(batches, None)
                self.data_wait_s += time.perf_counter() - wait_start
                if batch is None:
                    break
                position.batches_done += 1
                self.corrupt_shards += int(batch["corrupt_shards"])
                yield decode_samples(batch["x"].to(self.runtime.device, non_blocking=True), self.stream.manifest.dtype)
            position.epoch += 1
            position.batches_done = 0

    def _set_lr(self, step: int) -> None:
        t = self.cfg.train
        decay_start = t.steps * (1.0 - t.lr_decay_fraction)
        progress = min(max((step - decay_start) / max(t.steps - decay_start, 1.0), 0.0), 1.0)
        self.steps.set_lr_factor(self.state.lr_scale * (1.0 + (t.lr_final_factor - 1.0) * progress))

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        if not self._metric_names:
            self._metric_names = list(metrics)
        self._pending.append(torch.stack([metrics[k].float() for k in self._metric_names]))

    def _flush(self, step: int, elapsed: float, steps_done: int) -> dict[str, float]:
        """Reduces the pending per-step metrics over ranks; stops on the first non-finite value."""
        # The stop flag rides along in the same reduction: any rank signalled stops every rank.
        stop = torch.full(
            (1, len(self._metric_names)), float(self._stop_signal is not None), device=self.runtime.device
        )
        table = self.runtime.mean_across_ranks(torch.cat([torch.stack(self._pending), stop])).cpu()
        self.stop_requested = bool(table[-1, 0] > 0)
        table = table[:-1]
        first_step = step - len(self._pending) + 1
        self._pending.clear()
        # A skipped fp16 step (overflow) is the loss scaler doing its job, not divergence: its
        # metrics may be inf and are left out, unless every step of the window was skipped.
        skipped = table[:, self._metric_names.index("skipped_steps")]
        applied = table[skipped == 0]
        if len(applied) == 0:
            raise Diverged(f"every update of steps {first_step}..{step} overflowed and was skipped (fp16)")
        self._check_divergence(applied, first_step, rows=(skipped == 0).nonzero().flatten().tolist())
        out = dict(zip(self._metric_names, applied.mean(0).tolist()))
        # The penalty over the energy steps that computed it (all of them unless train.penalty_every > 1).
        counts = applied[:, self._metric_names.index("penalty_steps")]
        del out["penalty_steps"]
        if counts.sum() > 0:
            out["penalty"] = float((applied[:, self._metric_names.index("penalty")] * counts).sum() / counts.sum())
        else:
            del out["penalty"]
        out["skipped_steps"] = skipped.sum().item()
        samples = steps_done * self.cfg.train.energy_steps * self.cfg.data.batch_size
        out["samples_per_s"] = samples / max(elapsed, 1e-9)
        out["step_time_s"] = elapsed / max(steps_done, 1)
        out["data_wait_share"] = min(self.data_wait_s / max(elapsed, 1e-9), 1.0)
        self.data_wait_s = 0.0
        out["lr_energy"] = float(self.steps.energy_update.param_groups[0]["lr"])
        corrupt = self.runtime.sum_across_ranks(torch.tensor([float(self.corrupt_shards)], device=self.runtime.device))
        out["corrupt_shards"] = corrupt.item()
        return out

    def _check_divergence(self, table: torch.Tensor, first_step: int, rows: list[int] | None = None) -> None:
        """Raises Diverged naming the first step and term that is non-finite or past its bound."""
        guard = self.cfg.train.guard
        limits = torch.full((table.shape[1],), float("inf"), device=table.device)
        for name, bound in (("energy_gap", guard.max_abs_energy_gap), ("penalty", guard.max_penalty)):
            if bound > 0 and name in self._metric_names:
                limits[self._metric_names.index(name)] = bound
        bad = (~torch.isfinite(table) | (table.abs() > limits)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            value = table[row, col].item()
            what = (
                "non-finite" if not torch.isfinite(table[row, col]) else f"out-of-bound (|x| > {limits[col].item():g})"
            )
            at = first_step + (rows[row] if rows is not None else row)
            raise Diverged(f"{what} {self._metric_names[col]} = {value:.6g} at step {at}")

    def _roll_back(self, error: Diverged) -> None:
        """Restores the last checkpoint with lowered learning rates, or gives up with a clear error."""
        guard = self.cfg.train.guard
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if self.rollbacks >= guard.max_rollbacks or not checkpoints:
            reason = (
                "no checkpoint to roll back to" if not checkpoints else f"{self.rollbacks} rollback(s) did not help"
            )
            raise Diverged(
                f"{error}; {reason}. Stopping: checkpoints are intact in {self.checkpoint_dir}. "
                "Lower the learning rates or raise train.penalty_weight."
            ) from None
        self.rollbacks += 1
        lr_scale = self.state.lr_scale * guard.lr_factor
        self._pending.clear()
        self._load_checkpoint(checkpoints[-1])
        self.state.lr_scale = lr_scale
        event = {
            "event": "rollback",
            "reason": str(error),
            "to_step": self.state.step,
            "lr_scale": lr_scale,
            "rollback": self.rollbacks,
        }
        self.logger.log(self.state.step, event)
        if self.runtime.is_main:
            print(
                f"\ndivergence: {error}; rolled back to step {self.state.step} with learning rates x{lr_scale:g} "
                f"(rollback {self.rollbacks}/{guard.max_rollbacks})",
                flush=True,
            )

    def evaluate(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.evaluator is not None and self.runtime.is_main:
            generator = self.runtime.for_evaluation(self.generator)
            generator.eval()
            # Evaluation draws from a forked RNG so that it never changes the training trajectory.
            with torch.random.fork_rng(devices=[]):
                metrics = self.evaluator(step, self.runtime.for_evaluation(self.energy), generator)
            generator.train()
            self.logger.log(step, {f"eval_{k}": v for k, v in metrics.items()})
        self.runtime.barrier()
        return metrics

    def _save_checkpoint(self) -> None:
        """Saves at the current step; every rank must call it (the positions are gathered)."""
        mine = torch.zeros(self.runtime.world_size, 2, dtype=torch.int64, device=self.runtime.device)
        mine[self.runtime.rank, 0] = self.state.position.epoch
        mine[self.runtime.rank, 1] = self.state.position.batches_done
        every = self.runtime.sum_across_ranks(mine).tolist()
        self.state.rank_positions = [{"epoch": e, "batches_done": b} for e, b in every]
        self.runtime.save_checkpoint(self.checkpoint_dir, self.state.step, self.cfg.checkpoint.keep)

    def train(self) -> dict[str, float]:
        self.corrupt_shards = 0
        self.rollbacks = 0
        self.stop_requested = False
        if self.cfg.train.guard.max_rollbacks > 0 and not list_checkpoints(self.checkpoint_dir):
            # The initial networks are a good state to roll back to if the run diverges early.
            self._save_checkpoint()
        while True:
            try:
                last = self._train_until_done()
                break
            except Diverged as error:
                self._roll_back(error)
        last["ranks_in_sync"] = float(self.runtime.ranks_in_sync(self.energy, self.generator, self.statistics))
        if not last["ranks_in_sync"]:
            raise RuntimeError("ranks finished with different parameters: the process group did not synchronise")
        return last

    def _train_until_done(self) -> dict[str, float]:
        cfg = self.cfg
        batches = self._batches()
        last: dict[str, float] = {}
        tick, steps_since = time.perf_counter(), 0
        while self.state.step < cfg.train.steps:
            self._set_lr(self.state.step)
            self._record(self.steps.iteration(self.state.step, lambda: next(batches)))
            self.state.step += 1
            steps_since += 1
            step = self.state.step
            checkpoint_due = step % cfg.checkpoint.every == 0 or step == cfg.train.steps
            # Metrics are checked before every checkpoint, so a checkpoint is always a good one.
            if step % cfg.log.every == 0 or checkpoint_due:
                last = self._flush(step, time.perf_counter() - tick, steps_since)
                self.logger.log(step, last)
                tick, steps_since = time.perf_counter(), 0
            if checkpoint_due or self.stop_requested:
                self._save_checkpoint()
            if self.stop_requested:
                raise Preempted(f"stop signal received; checkpoint saved at step {step}, rerun to resume")
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
                last.update({f"eval_{k}": v for k, v in self.evaluate(step).items()})
            if steps_since == 0:  # keep checkpoint and eval time out of the throughput figures
                tick = time.perf_counter()
        return last
