"""The MEG training loop: iterations of the steps (trainer/steps.py), a metric reduction every
``log.every`` steps (trainer/metrics.py), checkpoints (trainer/checkpoint.py), evaluation, and a
rollback to the last checkpoint when the divergence guard trips (trainer/guard.py).

Every component is built outside and handed in (trainer/job.py does that), so the loop reads top
to bottom and owns no signal handler: a stop request arrives as an Event that the metric reduction
carries to every rank. The stop watchdog (trainer/main.py) ends a process that stopped making
progress, so the loop calls ``heartbeat`` with each batch it takes for a step and all through each save
and evaluation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from data_pipeline.config import StreamPosition
from data_pipeline.storage import PatientStop, StopRequested
from data_pipeline.stream import ShardStream, decode_samples
from trainer.checkpoint import Checkpoints, TrainState, checkpoint_step
from trainer.config import RunConfig
from trainer.evaluation import extra_evaluation_steps
from trainer.guard import Diverged, DivergenceGuard
from trainer.metrics import MetricsLogger, MetricWindow
from trainer.runtime import CollectiveError, Runtime, reported_failure
from trainer.steps import MEGSteps, lr_schedule

Evaluator = Callable[[int, nn.Module, nn.Module], dict[str, float]]

# A job that stopped because it was asked to (e.g. Slurm's warning signal before the time limit)
# exits with this code after checkpointing, so a wrapper script knows to requeue it.
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL
NETWORK_NAMES = ("energy", "generator", "statistics")  # the order of MEGSteps.modules()


class Preempted(RuntimeError):
    def __init__(self, message: str, checkpointed: bool = True):
        super().__init__(message)
        self.checkpointed = checkpointed  # False: the ranks did not stop together (see Runtime.shutdown)


def host_pinning(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the stream holds batches for ``device``: page-locked for CUDA, so that real_batches' copies
    run asynchronously (a non_blocking copy from pageable memory is a synchronous one); as read else."""
    return torch.Tensor.pin_memory if device.type == "cuda" else None


def real_batches(
    stream: ShardStream,
    position: StreamPosition,
    window: MetricWindow,
    device: torch.device,
    should_stop: Callable[[], bool],
    heartbeat: Callable[[], None],
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Real batches forever, each with the stream position after it (epoch, batches done): the loop
    keeps a position once the batch's iteration is done, so a stop while waiting loses nothing.
    ``should_stop``: when a wait for data gives up (StopRequested)."""
    epoch, done = position.epoch, position.batches_done
    while True:
        batches = iter(stream.epoch_batches(StreamPosition(epoch, done), should_stop))
        while True:
            wait_start = time.perf_counter()  # the data-wait share of a step, in the metrics
            batch = next(batches, None)
            window.data_wait_s += time.perf_counter() - wait_start
            if batch is None:
                break
            done += 1
            window.corrupt_shards += int(batch["corrupt_shards"])
            heartbeat()  # the loop asks for batches only as its steps complete
            yield decode_samples(batch["x"].to(device, non_blocking=True), stream.manifest.dtype), epoch, done
        epoch, done = epoch + 1, 0


def evaluation_due(cfg: RunConfig, step: int, extra_steps: set[int]) -> bool:
    """Every eval.every steps, at the last one, and at ``extra_steps`` (the evaluator's: under
    eval.kdd.protocol=paper the last epochs' ends)."""
    return bool(cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps or step in extra_steps


@contextmanager
def beating(heartbeat: Callable[[], None], limit: float, every: float = 1.0) -> Iterator[None]:
    """Calls ``heartbeat`` every ``every`` seconds from a thread while the block runs, for ``limit``
    seconds at most: a long save (a large model, a slow file system, a rank waiting for another's
    hashing pass) is progress, which the stop watchdog must not cut short after a stop signal; one
    still going after ``limit`` (a hung mount) is not, and the watchdog may end it then."""
    done = threading.Event()
    until = time.monotonic() + limit

    def beat() -> None:
        while not done.wait(every) and time.monotonic() < until:
            heartbeat()

    heartbeat()
    thread = threading.Thread(target=beat, name="save-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        heartbeat()


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    module.eval()
    try:
        yield
    finally:
        module.train()


class TrainingEvaluation:
    """The evaluations during a run: at the steps ``evaluation_due`` names, by ``evaluator`` (None: none)
    on the main process alone while the other ranks wait for it."""

    def __init__(
        self,
        cfg: RunConfig,
        runtime: Runtime,
        steps: MEGSteps,
        stream: ShardStream,
        evaluator: Evaluator | None,
        logger: MetricsLogger,
        heartbeat: Callable[[], None],
    ):
        self.cfg, self.runtime, self.steps, self.evaluator = cfg, runtime, steps, evaluator
        self.logger, self.heartbeat = logger, heartbeat
        self.extra_steps = extra_evaluation_steps(cfg, stream)
        if runtime.world_size > 1:
            # The ranks meet once on the waiting group now, which makes it where job.train has not: made
            # at the first evaluation instead, a main process that ended during it (killed, out of memory)
            # left the others waiting for it to join the group, a wait no closed connection ends, up to
            # the timeout.
            runtime.wait_for_main(cfg.train.evaluation_timeout)

    def due(self, step: int) -> bool:
        return evaluation_due(self.cfg, step, self.extra_steps)

    def missing(self, step: int) -> bool:
        """Whether the evaluation at ``step`` never completed (the run was killed during it)."""
        return self.evaluator is not None and not self.evaluator.has_result(step)

    def __call__(self, step: int) -> dict[str, float]:
        """The evaluation's results as the run's metrics (eval_<name>); collective."""
        metrics: dict[str, float] = {}
        failure: Exception | None = None
        # An evaluation is progress on every rank (the others wait for the main process's), which the
        # stop watchdog must not cut short: a stop signal during it is honoured when it ends.
        with beating(self.heartbeat, self.cfg.train.evaluation_timeout):
            if self.evaluator is not None:
                # The fp32 weights the checkpoint exports (every rank: DeepSpeed gathers its masters), G's EMA if kept.
                energy, generator = self.runtime.for_evaluation(self.steps.energy), self.steps.evaluation_generator()
                if self.runtime.is_main:  # alone, on forked generators (CPU and device) with its own seed:
                    # training is the same with or without it, and meg-evaluate draws the same samples.
                    self.logger.evaluating(True)
                    try:
                        with self.runtime.fork_rng(seed=self.cfg.eval.seed), evaluation_mode(generator):
                            metrics = {f"eval_{k}": v for k, v in self.evaluator(step, energy, generator).items()}
                    except StopRequested:  # a stop while waiting on storage: job.run's, as before
                        raise
                    except Exception as e:  # raised below, once the other ranks know
                        failure = e
                    finally:
                        self.logger.evaluating(False)
                    if failure is None:
                        try:
                            self.logger.log(step, metrics)
                        except Exception as e:  # its sinks (the curves' figure, a tracker) fail on it alone too
                            failure = e
            # The other ranks wait here for the main process: told of its failure, each stops at once
            # too (else they waited on for train.evaluation_timeout while it waited for them elsewhere).
            failed = self.runtime.wait_for_main(self.cfg.train.evaluation_timeout, failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise CollectiveError(
                f"rank {self.runtime.rank} of {self.runtime.world_size}: the main process's evaluation at step "
                f"{step} failed (its error says why); this rank stops too, the newest checkpoint stands"
            )
        return metrics


class MEGTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        runtime: Runtime,
        steps: MEGSteps,
        stream: ShardStream,
        logger: MetricsLogger,
        checkpoints: Checkpoints,
        evaluator: Evaluator | None = None,
        stop: threading.Event | None = None,
        heartbeat: Callable[[], None] | None = None,
        data_stop: threading.Event | PatientStop | None = None,
    ):
        """``data_stop``: the stop request as a wait for data sees it (default ``stop``; job.py's)."""
        self.cfg, self.runtime, self.steps, self.stream = cfg, runtime, steps, stream
        self.logger, self.checkpoints = logger, checkpoints
        self.stop, self.heartbeat = stop or threading.Event(), heartbeat or (lambda: None)
        self.data_stop = data_stop or self.stop
        self.state = TrainState(runtime.rank, runtime.world_size, entropy_state=steps.entropy_state)
        self.guard = DivergenceGuard(cfg.train.guard)
        self.loaded: str | None = None  # the checkpoint last loaded (resume or rollback)
        self.window = MetricWindow(runtime, self.guard, cfg.train.energy_steps * cfg.data.batch_size)
        self.evaluation = TrainingEvaluation(cfg, runtime, steps, stream, evaluator, logger, self.heartbeat)

    def resume_if_possible(self, checkpoint: str | None) -> int | None:
        """Loads ``checkpoint`` (or, found damaged, the one before it); returns the step loaded (None: a new
        run), and raises CheckpointError when every one left turns out damaged."""
        if checkpoint is not None and self._load(checkpoint) is None:  # each one left turned out damaged
            raise self.checkpoints.none_intact()
        if self.state.lr_horizon == 0:  # a new run (or one from before the horizon was kept)
            self.state.lr_horizon = self.cfg.train.steps
        self.logger.resumed_at(self.state.step)
        return checkpoint_step(self.loaded) if checkpoint is not None else None

    def _load(self, path: str | None) -> str | None:
        self.loaded = self.checkpoints.load_newest(self.runtime, self.state, path, self.steps.load_extra_weights)
        self.steps.after_checkpoint_load()
        return self.loaded

    def _iteration_data(self, batches: Iterator[tuple[torch.Tensor, int, int]]) -> list:
        """The iteration's batches, fetched before it runs: a stop while waiting for them loses no update."""
        with contextlib.suppress(StopRequested):
            return [next(batches) for _ in range(self.cfg.train.energy_steps)]
        if self.runtime.world_size > 1:
            # A checkpoint is collective, and the other ranks may be inside this step's gradient
            # reduction, waiting for this rank (whose data did not come within job.py's patience):
            # the newest checkpoint stands.
            raise Preempted("stop signal received while waiting for data; the newest checkpoint stands", False)
        self._save()
        raise Preempted(f"stop signal received while waiting for data; checkpoint saved at step {self.state.step}")

    def _iteration(self, data: list) -> None:
        try:
            self.window.record(self.steps.iteration(self.state.step, iter([x for x, _, _ in data]).__next__))
        except RuntimeError as e:  # a collective failed: did a rank waiting for data stop (see above)?
            if isinstance(e, Diverged) or not (self.stop.is_set() and self.runtime.world_size > 1):
                raise
            if reported_failure() is not None:  # a rank failed (the launcher then stops the others): job.run says so
                raise
            message = "stop signal received; another rank stopped while waiting for data, the newest checkpoint stands"
            raise Preempted(message, checkpointed=False) from None

    def _set_lr(self, step: int) -> None:
        # The schedule's horizon is the run's first train.steps: extending a run leaves its past alone.
        self.steps.set_lr_factor(self.state.lr_scale * lr_schedule(step, self.state.lr_horizon, self.cfg.train))

    def _roll_back(self, error: Diverged) -> None:
        """Restores the newest intact checkpoint (one further back after a repeated failure, see
        trainer/guard.py) with lowered learning rates, or gives up clearly."""
        if self.guard.flee_repeated(error, self.loaded):
            self.checkpoints.set_aside_fled(self.runtime, self.loaded)
        newest = self.checkpoints.newest_intact(self.runtime)
        lr_scale = self.state.lr_scale * self.guard.next_rollback(error, newest)
        self.window.clear()
        if self._load(newest) is None:  # every one left is damaged
            raise self.guard.give_up(error, None)
        self.state.lr_scale = lr_scale
        event = {"event": "rollback", "reason": str(error), "nonfinite": error.nonfinite, "lr_scale": lr_scale}
        self.logger.log(self.state.step, {**event, "to_step": self.state.step, "rollback": self.guard.rollbacks})
        if self.runtime.is_main:
            print(f"\ndivergence: {error}; {self.guard.rolled_back(self.state.step, lr_scale)}", flush=True)

    def _stop_if_asked(self, saved: bool, during: str) -> None:
        """A stop request that came where no metric reduction carries it (the set-up, an evaluation: neither
        changes the training state): every rank agrees on it here, and the run ends with the requeue code,
        saving unless a checkpoint holds the state already (``saved``)."""
        if self.runtime.sum_across_ranks(torch.tensor([float(self.stop.is_set())], device=self.runtime.device)).item():
            if not saved:
                self._save()
            raise Preempted(f"stop signal received {during}; checkpoint at step {self.state.step}, rerun to resume")

    def _save(self) -> None:
        """A checkpoint of the current state, once the guard has seen sane weights (collective); one
        longer than the collective timeout (which bounds its collectives) is taken as hung."""
        with beating(self.heartbeat, self.cfg.train.collective_timeout):
            self.guard.check_parameters(dict(zip(NETWORK_NAMES, self.steps.modules())), self.state.step)
            self.checkpoints.save(self.runtime, self.state, self.steps.extra_weights())
        self.logger.checkpointed(self.state.step)

    def train(self) -> dict[str, float]:
        saved = self.loaded is not None and checkpoint_step(self.loaded) == self.state.step
        if self.cfg.train.guard.max_rollbacks > 0 and not self.checkpoints.list():
            self._save()  # the initial networks: a good state to roll back to if the run diverges early
            saved = True
        self._stop_if_asked(saved, "before training")  # (saving again would make a copy, as .replaced)
        while True:
            try:
                last = self._train_until_done()
                break
            except Diverged as error:
                self._roll_back(error)
        last["ranks_in_sync"] = float(self.runtime.ranks_in_sync(*self.steps.modules(), *self.steps.averaged()))
        if not last["ranks_in_sync"]:
            raise RuntimeError("ranks finished with different parameters: the process group did not synchronise")
        return last

    def _train_until_done(self) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        device = self.runtime.device
        batches = real_batches(self.stream, state.position, self.window, device, self.data_stop.is_set, self.heartbeat)
        last: dict[str, float] = {}
        tick, steps_since = time.perf_counter(), 0
        if state.step >= cfg.train.steps and self.evaluation.missing(state.step):
            last.update(self.evaluation(state.step))  # a finished run's final evaluation, killed during it
        while state.step < cfg.train.steps:
            self._set_lr(state.step)
            started = time.perf_counter()
            data = self._iteration_data(batches)
            self._iteration(data)
            self.window.step_durations.append(time.perf_counter() - started)
            state.position.epoch, state.position.batches_done = data[-1][1:]
            state.step += 1
            steps_since += 1
            checkpoint_due = state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.steps
            stop_requested = False
            # Metrics are checked before every checkpoint, so a checkpoint is always a good one.
            if state.step % cfg.log.every == 0 or checkpoint_due:
                last, stop_requested = self.window.reduce(state.step, time.perf_counter() - tick, self.stop.is_set())
                last.update(self.steps.learning_rates())
                self.logger.log(state.step, last)
                self.logger.rank_stats(self.window.rank_stats)
                tick, steps_since = time.perf_counter(), 0
            if checkpoint_due or stop_requested:
                self._save()
            if stop_requested:
                raise Preempted(f"stop signal received; checkpoint saved at step {state.step}, rerun to resume")
            if self.evaluation.due(state.step):
                last.update(self.evaluation(state.step))
                if state.step < cfg.train.steps:  # else the run has ended anyway
                    self._stop_if_asked(checkpoint_due, "during the evaluation")
            if steps_since == 0:  # keep checkpoint and eval time out of the throughput figures
                tick = time.perf_counter()
        return last
