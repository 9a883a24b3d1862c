"""Metrics: the window that reduces them over ranks, and the sinks where the numbers go.

- ``MetricWindow``: the per-step metrics of one log interval, kept on the device and reduced over
  ranks in two collectives, the step table with the stop flag (a mean) and the corrupt-shard count
  (a sum) - each a host sync, so not done every step; with throughput, data wait and fp16 skips.
  The divergence guard checks the table.
- JSONL file in the run folder (main process): one object per log interval, eval and event.
- Prometheus endpoint per rank, target files and Pushgateway (trainer/prometheus.py) for Grafana.
- A live progress line (main process): step, losses, samples/s, ETA.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer import strict_json
from trainer.guard import Diverged, DivergenceGuard
from trainer.nofollow import open_append
from trainer.progress import format_duration


@dataclass
class RankStats:
    """What one log window measured on this process alone (not reduced over ranks)."""

    data_wait_s: float = 0.0  # blocked on the next batch
    corrupt_shards: int = 0  # skipped since the process started
    step_durations: list[float] = field(default_factory=list)  # wall time of each iteration


class MetricWindow:
    """One log interval's metrics: ``record`` a dict of 0-dim device tensors per step, then ``reduce``."""

    def __init__(self, runtime, guard: DivergenceGuard, samples_per_step: int):
        self.runtime, self.guard, self.samples_per_step = runtime, guard, samples_per_step
        self.rows: list[torch.Tensor] = []
        self.names: list[str] = []
        self.data_wait_s = 0.0  # time blocked on the next batch since the last reduction
        self.corrupt_shards = 0  # on this rank, since the start of the process
        self.step_durations: list[float] = []  # wall time of each iteration since the last reduction
        self.rank_stats = RankStats()  # what the last reduction measured on this rank alone

    def record(self, metrics: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(metrics)
        self.rows.append(torch.stack([metrics[k].float() for k in self.names]))

    def clear(self) -> None:
        self.rows.clear()
        self.data_wait_s = 0.0
        self.step_durations = []

    def reduce(self, step: int, elapsed: float, stop: bool) -> tuple[dict[str, float], bool]:
        """The window's means over steps and ranks (raises Diverged through the guard), and whether
        any rank asked to stop: the flag rides along in the same reduction."""
        runtime, names = self.runtime, self.names
        flag = torch.full((1, len(names)), float(stop), device=runtime.device)
        table = runtime.mean_across_ranks(torch.cat([torch.stack(self.rows), flag])).cpu()
        stop_requested = bool(table[-1, 0] > 0)
        table, steps_done = table[:-1], len(self.rows)
        steps = list(range(step - steps_done + 1, step + 1))
        data_wait_s = self.data_wait_s
        self.rank_stats = RankStats(data_wait_s, self.corrupt_shards, self.step_durations)
        self.clear()
        # A skipped fp16 step (overflow) is the loss scaler doing its job, not divergence: its
        # metrics may be inf and are left out, unless every step of the window was skipped.
        skipped = table[:, names.index("skipped_steps")]
        applied = table[skipped == 0]
        if len(applied) == 0:
            raise Diverged(f"every update of steps {steps[0]}..{step} overflowed and was skipped (fp16)")
        self.guard.check(applied, names, [s for s, keep in zip(steps, (skipped == 0).tolist()) if keep])
        out = dict(zip(names, applied.mean(0).tolist()))
        # The penalty over the energy steps that computed it (all of them unless train.penalty_every > 1).
        counts = applied[:, names.index("penalty_steps")]
        del out["penalty_steps"]
        if counts.sum() > 0:
            out["penalty"] = float((applied[:, names.index("penalty")] * counts).sum() / counts.sum())
        else:
            del out["penalty"]
        out["skipped_steps"] = skipped.sum().item()
        out["samples_per_s"] = steps_done * self.samples_per_step / max(elapsed, 1e-9)
        out["step_time_s"] = elapsed / max(steps_done, 1)
        out["data_wait_share"] = min(data_wait_s / max(elapsed, 1e-9), 1.0)
        corrupt = torch.tensor([float(self.corrupt_shards)], device=runtime.device)
        out["corrupt_shards"] = runtime.sum_across_ranks(corrupt).item()
        return out, stop_requested


class MetricSink:
    """Where metrics go. ``log`` gets the window means, evaluations and events; the other calls are
    for sinks that need them (Prometheus) and do nothing by default."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        raise NotImplementedError

    def resumed_at(self, step: int) -> None:
        """The run starts at ``step`` (0, or the checkpoint it resumed from)."""

    def rank_stats(self, stats: RankStats) -> None:
        """This rank's own measurements of the window just reduced."""

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` was saved."""

    def evaluating(self, running: bool) -> None:
        """The main process starts (``running``) or ends an evaluation, which pauses training."""

    def close(self, clean: bool = True) -> None:
        """The process ends; ``clean`` is False after a crash."""


class JsonlSink(MetricSink):
    def __init__(self, path: str):
        self.file = open_append(path)  # a link is refused, not followed (trainer/nofollow.py)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(strict_json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def resumed_at(self, step: int) -> None:
        """A line saying where this process starts: the lines before it of later steps are those of a
        process that ended past its last checkpoint, and this one logs those steps again (the curves
        leave the earlier ones out: trainer/plots.py)."""
        self.log(step, {"event": "start"})

    def close(self, clean: bool = True) -> None:
        self.file.close()


class CurvesSink(MetricSink):
    """Redraws the run's loss-curve figure from metrics.jsonl (written by the JsonlSink before it) at
    each evaluation; matplotlib is imported at the first one."""

    def __init__(self, metrics_path: str, figure_path: str, title: str):
        self.metrics_path, self.figure_path, self.title = metrics_path, figure_path, title

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if any(k.startswith("eval_") for k in metrics):
            from trainer.plots import loss_curves

            loss_curves(self.figure_path, self.metrics_path, self.title)


class ProgressSink(MetricSink):
    """One line per log interval; rewritten in place when the output is a terminal."""

    SHOWN = ("energy_loss", "generator_loss", "energy_gap", "penalty", "mi_estimate", "sample_spread")

    def __init__(self, total_steps: int, stream=sys.stdout):
        self.total, self.stream = total_steps, stream
        self.tty = stream.isatty()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "samples_per_s" not in metrics:
            return
        losses = " ".join(f"{k}={metrics[k]:.4g}" for k in self.SHOWN if k in metrics)
        eta = (self.total - step) * metrics.get("step_time_s", float("nan"))
        line = (
            f"step {step}/{self.total} {losses} | {metrics['samples_per_s']:.0f} samples/s | ETA {format_duration(eta)}"
        )
        self.stream.write(("\r\033[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self, clean: bool = True) -> None:
        if self.tty:
            self.stream.write("\n")


class MetricsLogger(MetricSink):
    """Fans each call out to every sink."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def resumed_at(self, step: int) -> None:
        for sink in self.sinks:
            sink.resumed_at(step)

    def rank_stats(self, stats: RankStats) -> None:
        for sink in self.sinks:
            sink.rank_stats(stats)

    def checkpointed(self, step: int) -> None:
        for sink in self.sinks:
            sink.checkpointed(step)

    def evaluating(self, running: bool) -> None:
        for sink in self.sinks:
            sink.evaluating(running)

    def close(self, clean: bool = True) -> None:
        for sink in self.sinks:
            sink.close(clean)
