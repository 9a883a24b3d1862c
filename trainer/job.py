"""The training job: every component built from the configuration (runtime, data, networks, steps,
stream, sinks, checkpoints, evaluator), the run folder locked, then the loop run. trainer/main.py is
the command line in front of it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from data_pipeline import storage
from data_pipeline.cli import nearest_existing, short_message
from data_pipeline.dataset import Dataset, open_dataset, write_toy_data
from data_pipeline.shards import MANIFEST_NAME, manifest_url
from data_pipeline.storage import StopRequested
from models.factory import build_networks
from trainer import strict_json
from trainer.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    Checkpoints,
    is_checkpoint_folder,
    list_checkpoints,
    load_export,
    package_version,
    run_folder_of,
)
from trainer.config import ConfigError, RunConfig, config_from_yaml, config_to_yaml, vera_settings
from trainer.evaluation import build_evaluator, check_samples, extra_evaluation_steps
from trainer.meg_trainer import MEGTrainer, Preempted, host_pinning
from trainer.metrics import CurvesSink, JsonlSink, MetricsLogger, ProgressSink
from trainer.nofollow import check_run_folder, write_replacing
from trainer.prometheus import PrometheusExporter
from trainer.run_folder import RunFolderBusy, RunFolderLock
from trainer.runtime import Runtime, build_runtime, collective_failure, report_failure
from trainer.steps import build_steps, resolve_kernels
from trainer.trackers import TrackerSink

log = logging.getLogger("meg")


def engine_name(cfg: RunConfig) -> str:
    """The engine as the start-up line and the metrics' run info name it: ddp, deepspeed ZeRO-2."""
    return cfg.train.engine + (f" ZeRO-{cfg.deepspeed.zero_stage}" if cfg.train.engine == "deepspeed" else "")


def build_logger(cfg: RunConfig, runtime: Runtime, preset: str) -> tuple[MetricsLogger, PrometheusExporter | None]:
    sinks = []
    if runtime.is_main:
        sinks.append(JsonlSink(os.path.join(cfg.output_dir, "metrics.jsonl")))
        if cfg.eval.plots:  # after the JSONL sink: the figure reads the line it wrote
            figure = os.path.join(cfg.output_dir, "eval", "curves.png")
            sinks.append(CurvesSink(os.path.join(cfg.output_dir, "metrics.jsonl"), figure, f"run {cfg.name}"))
        if cfg.log.progress:
            sinks.append(ProgressSink(cfg.train.steps))
        if cfg.log.trackers:
            sinks.append(TrackerSink(cfg.log.trackers, cfg.name, cfg.output_dir, dataclasses.asdict(cfg)))
    prometheus = None
    if cfg.log.prometheus_port >= 0:
        info = {
            "preset": os.path.basename(preset).removesuffix(".yaml") if preset else "",
            "engine": engine_name(cfg),
            "precision": cfg.train.mixed_precision,
            "world_size": str(runtime.world_size),
            "version": package_version(),
        }
        prometheus = PrometheusExporter(
            cfg.log,
            cfg.name,
            runtime.rank,
            int(os.environ.get("LOCAL_RANK", runtime.rank)),
            runtime.device,
            cfg.train.steps,
            cfg.train.energy_steps * cfg.data.batch_size,
            info,
            run_folder=cfg.output_dir,
        )
        sinks.append(prometheus)
    return MetricsLogger(sinks), prometheus


# How long a rank of several waits on for data after a stop request (see run): below the stop
# watchdog's grace, which ends a rank whose storage hangs with its own message.
DATA_STOP_PATIENCE_SECONDS = 15.0


def run(
    cfg: RunConfig, stop: threading.Event, preset: str = "", heartbeat: Callable[[], None] | None = None
) -> dict[str, float]:
    """``preset``: the --config it came from, for the metrics' run info; ``heartbeat``: called as the
    training progresses (trainer/main.py's stop watchdog)."""
    check_output_dir(cfg.output_dir, cfg.data.url)
    check_run_folder(cfg.output_dir)  # links where the run writes: refused before any work
    runtime = build_runtime(cfg)
    # Every storage call from here on is bounded by data.io_timeout and ends on a stop request: one rank
    # saves at once; several save together at their next metric reduction, which the data of slow
    # storage may still let them reach (within the stop watchdog's 20 s, trainer/main.py).
    data_stop: threading.Event | storage.PatientStop = stop
    if runtime.world_size > 1:
        data_stop = storage.PatientStop(stop, DATA_STOP_PATIENCE_SECONDS)
        heartbeat = _beating_both(heartbeat, data_stop)
    earlier_policy = dataclasses.replace(storage.policy())
    storage.configure(timeout=cfg.data.io_timeout, stop=data_stop)
    meet, failing = True, True  # failing until train() returns: sys.exc_info() would see a caller's handled error too
    try:
        # Everything that holds the process group (DDP wrappers, engines) lives in train() and is
        # released when it returns, before the group is destroyed.
        result = train(cfg, runtime, stop, preset, heartbeat, data_stop)
        failing = False
        return result
    except Preempted as e:
        meet = e.checkpointed
        raise
    except StopRequested as e:  # while waiting on storage outside the training loop (start-up, evaluation)
        meet = False
        doing = (
            f"while writing the toy data ({e}: the next run writes it again)" if str(e) else "while waiting for storage"
        )
        raise Preempted(f"stop signal received {doing}; the newest checkpoint stands", False) from None
    except Exception as e:
        failed = collective_failure(e, runtime, cfg.train.collective_timeout) if isinstance(e, RuntimeError) else None
        if failed is not None:
            meet = False  # the other ranks are gone or stopped: meeting them would wait for the timeout again
            # The launcher stops the other ranks once one failed: not this rank's error, unless a rank
            # said in the store that it failed (then that is the error to tell, not a preemption).
            if stop.is_set() and failed.failed_rank is None:
                message = "stop signal received as the other ranks stopped; the newest checkpoint stands"
                raise Preempted(message, False) from None
            raise failed from None
        if runtime.world_size > 1 and not isinstance(e, ConfigError):  # a configuration fails on every rank
            # A failure of this rank alone (out of memory, a CUDA error, a full disk, a bad shard): the
            # others wait in another collective, which a meeting here would never match (each side then
            # waited out train.collective_timeout, the others saying that this rank hung). This rank leaves
            # without meeting them: its exit closes its connections, which ends their collective at once,
            # and its line in the store tells them which rank failed and why.
            meet = False
            report_failure(runtime.rank, runtime.world_size, e)
            log.error(
                "rank %d of %d stops: %s: %s; the other ranks stop as it leaves",
                runtime.rank, runtime.world_size, type(e).__name__, short_message(e),
            )  # fmt: skip
        raise
    finally:
        _leave(runtime, meet, cfg.train.collective_timeout, failing)
        # This run's stop request ends this run's storage waits and writes only: a next run in this process
        # (the KDD protocol's splits, tests) starts without it.
        storage.policy().stop, storage.policy().timeout = earlier_policy.stop, earlier_policy.timeout


def _leave(runtime: Runtime, meet: bool, collective_timeout: float, failing: bool) -> None:
    """``runtime.shutdown(meet)``. A meeting the other ranks miss (hung, stopped or lost) is a
    CollectiveError's one line, or, when this rank is already ``failing``, a logged line beside its own
    error, which stays the one the user reads (raised from a finally, it replaced it as a traceback)."""
    try:
        runtime.shutdown(meet)
    except RuntimeError as e:
        failed = collective_failure(e, runtime, collective_timeout)
        if failed is None:
            raise
        if not failing:
            raise failed from None
        log.error("%s", failed)


def _beating_both(heartbeat: Callable[[], None] | None, data_stop: storage.PatientStop) -> Callable[[], None]:
    """``heartbeat`` that also tells ``data_stop`` of the progress: its patience counts from there, as the
    stop watchdog's grace does."""

    def beat() -> None:
        if heartbeat is not None:
            heartbeat()
        data_stop.progressed()

    return beat


def check_batch_split(cfg: RunConfig, world_size: int) -> None:
    """Raises ConfigError when data.batch_size cannot be split evenly over ``world_size`` ranks."""
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {world_size} ranks")


def check_output_dir(folder: str, data_url: str) -> None:
    """Raises ConfigError when ``folder`` (output_dir) cannot hold a run: not a folder (a file, or a path under one), a
    checkpoint, or a run's checkpoints/ folder (a run there would write its config.yaml into the checkpoint
    and its own checkpoints beside the run's), a data set's folder (it holds manifest.json) or data.url's
    folder (the run's checkpoints and metrics would land among the data's shards, and a toy preset would
    write its shards among the run's files)."""
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(folder) else f": {existing}"
        raise ConfigError(f"output_dir={folder}{where} is not a folder: choose another output_dir")
    if is_checkpoint_folder(folder):
        raise ConfigError(
            f"output_dir={folder} is a checkpoint, not a run folder: to resume it, train with "
            f"output_dir={run_folder_of(folder)}; else choose a new folder"
        )
    if list_checkpoints(folder):
        raise ConfigError(
            f"output_dir={folder} holds checkpoints (step_XXXXXXXX): it is a run's checkpoints/ folder; to resume "
            f"that run, train with output_dir={os.path.dirname(os.path.abspath(folder.rstrip('/')))}"
        )
    if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        raise ConfigError(
            f"output_dir={folder} holds a data set ({MANIFEST_NAME}): the run's files would mix with its shards; "
            "choose another output_dir"
        )
    if "://" not in data_url and os.path.realpath(os.path.dirname(manifest_url(data_url))) == os.path.realpath(folder):
        raise ConfigError(
            f"output_dir={folder} is data.url's folder ({data_url}): the run's files would mix with the data's "
            "shards; choose another output_dir"
        )


def settings_differences(cfg: RunConfig, saved: RunConfig, checkpoint: str, world_size: int | None) -> list[str]:
    """What of the model, entropy estimator and engine differs between the run (``cfg``) and the
    checkpoint's configuration (``saved``) that the checkpoint cannot resume into; with ``world_size``
    (None: not known) also FSDP's and ZeRO's optimizer shards on another number of ranks."""
    differences = [
        f"model.{key}: {getattr(saved.model, key)!r} in the checkpoint, {getattr(cfg.model, key)!r} now"
        for key in vars(cfg.model)
        if key != "kernels" and getattr(saved.model, key) != getattr(cfg.model, key)
    ]
    if saved.train.entropy_estimator != cfg.train.entropy_estimator:
        differences.append(
            f"train.entropy_estimator: {saved.train.entropy_estimator!r} in the checkpoint, "
            f"{cfg.train.entropy_estimator!r} now"
        )
    if saved.train.engine != cfg.train.engine:
        differences.append(f"train.engine: {saved.train.engine!r} in the checkpoint, {cfg.train.engine!r} now")
    elif cfg.train.engine == "deepspeed":
        # DeepSpeed reads its checkpoint through the optimizer wrapper of the precision and stage it
        # runs now (a loss scaler in fp16, ZeRO's partitions from stage 1), not those it was saved with.
        for key in ("train.mixed_precision", "deepspeed.zero_stage"):
            section, field_name = key.split(".")
            was, now = getattr(getattr(saved, section), field_name), getattr(getattr(cfg, section), field_name)
            if was != now:
                differences.append(f"{key}: {was!r} in the checkpoint, {now!r} now (DeepSpeed cannot switch it)")
    sharded = {"fsdp": "FSDP's", "deepspeed": "ZeRO's" if saved.deepspeed.zero_stage > 0 else None}
    if world_size is not None and sharded.get(saved.train.engine) and saved.train.engine == cfg.train.engine:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            ranks = len(json.load(f)["rank_positions"])
        if ranks != world_size:
            differences.append(
                f"ranks: {ranks} wrote the checkpoint, {world_size} now "
                f"({sharded[saved.train.engine]} optimizer shards are per rank)"
            )
    return differences


def refuse_resume(checkpoint: str, differences: list[str]) -> None:
    if differences:
        raise ConfigError(
            f"cannot resume {checkpoint}: " + "; ".join(differences) + ". Resume with the run's own settings, "
            "or train into another output_dir (or set checkpoint.resume=false to start over in this one)."
        )


def check_resumable(cfg: RunConfig, checkpoint: str, data: dict, world_size: int) -> None:
    """Raises ConfigError when the run asks for another model, engine, data set or data shape (``data``:
    the run's ``dataset`` and ``sample_shape``) than the checkpoint it would resume holds, or for what
    its engine cannot resume into (FSDP's and ZeRO's optimizer shards on another number of ranks,
    DeepSpeed's loss scaler in another precision): before anything of the run folder is overwritten,
    and before a mismatch found while loading could pass for damage."""
    _, info, saved_yaml = load_export(checkpoint)
    saved = config_from_yaml(saved_yaml, os.path.join(checkpoint, "config.yaml"))
    differences = settings_differences(cfg, saved, checkpoint, world_size)
    if list(info["sample_shape"]) != list(data["sample_shape"]):
        differences.append(
            f"sample shape: {info['sample_shape']} in the checkpoint, {data['sample_shape']} in data.url now"
        )
    # Another data set of the same shape (a preset's toy data for another's) trained on silently, its
    # stream position applied to the new data.
    if info.get("dataset", data["dataset"]) != data["dataset"]:
        differences.append(f"data set: {info['dataset']!r} in the checkpoint, {data['dataset']!r} in data.url now")
    refuse_resume(checkpoint, differences)


def check_resume_settings(cfg: RunConfig, world_size: int | None) -> None:
    """--check's share of check_resumable, without the data (which --check does not read): the settings
    against the newest checkpoint in the run folder, which the run would resume (a damaged one is
    the run's to name, as it then tries the one before)."""
    found = list_checkpoints(os.path.join(cfg.output_dir, "checkpoints")) if cfg.checkpoint.resume else []
    if not found:
        return
    try:
        with open(os.path.join(found[-1], CONFIG_FILE)) as f:
            saved = config_from_yaml(f.read(), os.path.join(found[-1], CONFIG_FILE))
        differences = settings_differences(cfg, saved, found[-1], world_size)
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return
    refuse_resume(found[-1], differences)


def set_aside_earlier_run(folder: str) -> str | None:
    """Moves an earlier run's checkpoints, evaluations, metrics (and its config.yaml and tracker logs)
    into ``folder/previous-<UTC time>/`` and says so in one warning; returns that folder, or None when
    there was no earlier run. Called by the main process under the run folder's lock: nothing is
    deleted, and the newest checkpoint of ``folder/checkpoints`` is then this run's."""
    names = ("checkpoints", "eval", "metrics.jsonl", "config.yaml", "tensorboard", "wandb")
    present = [name for name in names if os.path.lexists(os.path.join(folder, name))]
    if not any(name in present for name in ("checkpoints", "eval", "metrics.jsonl")):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = os.path.join(folder, f"previous-{stamp}"), 1
    while os.path.lexists(aside):  # two restarts within a second
        n += 1
        aside = os.path.join(folder, f"previous-{stamp}-{n}")
    os.mkdir(aside)
    for name in present:
        os.rename(os.path.join(folder, name), os.path.join(aside, name))
    log.warning("checkpoint.resume=false: the earlier run's %s moved to %s", ", ".join(present), aside)
    return aside


def check_architecture(cfg: RunConfig, sample_shape: list[int]) -> None:
    """Raises ConfigError when model.arch cannot take samples of ``sample_shape`` (conv networks of 2-D
    points), before the run folder is touched: the networks are built on the meta device, which holds no
    memory, and the models know no config errors."""
    try:
        with torch.device("meta"):
            build_networks(cfg.model, tuple(sample_shape), vera=vera_settings(cfg))
    except ValueError as e:
        raise ConfigError(f"model.arch={cfg.model.arch}: {e}") from None


def train(
    cfg: RunConfig,
    runtime: Runtime,
    stop: threading.Event,
    preset: str,
    heartbeat: Callable[[], None] | None = None,
    data_stop: threading.Event | storage.PatientStop | None = None,
) -> dict[str, float]:
    check_batch_split(cfg, runtime.world_size)
    if runtime.world_size > 1:
        # The evaluations' waiting group (Runtime.wait_for_main), made while the ranks are in step: made
        # after the main process's own work below, a failure there left the others in the store's wait to
        # make it, which no closed connection ends, for train.evaluation_timeout.
        runtime.wait_for_main(cfg.train.evaluation_timeout)
    if runtime.is_main:
        write_toy_data(cfg.data, cfg.train.seed)
    runtime.barrier()
    dataset = open_dataset(cfg.data)
    check_samples(cfg, dataset.manifest.sample_shape)  # FID of 2D points: said before the run folder is touched
    check_architecture(cfg, dataset.manifest.sample_shape)
    config_yaml = config_to_yaml(cfg)
    info = {
        "sample_shape": list(dataset.manifest.sample_shape),
        "dataset": dataset.manifest.name,
        "data_url": dataset.location,
    }
    checkpoints = Checkpoints(
        os.path.join(cfg.output_dir, "checkpoints"),
        cfg.checkpoint.keep,
        config_yaml,
        info,
        max_norm=cfg.train.guard.max_param_norm,
        keep_first=cfg.train.guard.max_rollbacks > 0,  # step 0: the guard's last way back
    )
    # One trainer per run folder, locked before anything in it is written; every rank learns the outcome.
    lock = RunFolderLock(cfg.output_dir)
    busy = lock.try_acquire() if runtime.is_main else None
    if runtime.sum_across_ranks(torch.tensor([float(busy is not None)], device=runtime.device)).item():
        raise RunFolderBusy(busy or f"{cfg.output_dir} is in use by another trainer (rank 0 says which)")
    resume_from = checkpoints.newest_intact(runtime) if cfg.checkpoint.resume else None
    if cfg.checkpoint.resume and resume_from is None:
        found = float(bool(checkpoints.list())) if runtime.is_main else 0.0
        if runtime.sum_across_ranks(torch.tensor([found], device=runtime.device)).item():
            raise checkpoints.none_intact()
    if resume_from is not None:
        check_resumable(cfg, resume_from, info, runtime.world_size)
    try:
        return _train(cfg, runtime, stop, dataset, checkpoints, resume_from, config_yaml, preset, heartbeat, data_stop)
    finally:
        lock.release()


def _train(
    cfg,
    runtime,
    stop,
    dataset: Dataset,
    checkpoints: Checkpoints,
    resume_from: str | None,
    config_yaml: str,
    preset: str,
    heartbeat: Callable[[], None] | None,
    data_stop: threading.Event | storage.PatientStop | None,
) -> dict[str, float]:
    manifest = dataset.manifest
    runtime.seed(cfg.train.seed, per_rank=False)  # identical initial networks on every rank
    nets = build_networks(cfg.model, tuple(manifest.sample_shape), resolve_kernels(cfg, runtime), vera_settings(cfg))
    runtime.seed(cfg.train.seed, per_rank=True)  # different noise on each rank
    steps = build_steps(cfg, runtime, nets)
    stream = dataset.stream(runtime.rank, runtime.world_size, cfg.train.seed, pin=host_pinning(runtime.device))
    extra_evaluation_steps(cfg, stream)  # eval.kdd.protocol=paper: epochs train.steps cannot hold, before step 0
    evaluator = build_evaluator(cfg, manifest.sample_shape, manifest.name)
    # Starting over: the earlier run's files would mix with ours. Moved once nothing above refused the
    # settings (they stayed moved aside when it did), and before the metrics file opens.
    if runtime.is_main and not cfg.checkpoint.resume:
        set_aside_earlier_run(cfg.output_dir)
    runtime.barrier()
    logger, prometheus = build_logger(cfg, runtime, preset)
    trainer = MEGTrainer(cfg, runtime, steps, stream, logger, checkpoints, evaluator, stop, heartbeat, data_stop)
    resumed = trainer.resume_if_possible(resume_from)
    if runtime.is_main and resumed is not None and resumed >= cfg.train.steps:
        log.warning(
            "the run is at step %d and train.steps=%d: nothing to train%s; raise train.steps to go on",
            resumed, cfg.train.steps, " (train.steps does not take a run back)" if resumed > cfg.train.steps else "",
        )  # fmt: skip
    if runtime.is_main:
        # Once the resume succeeded: a run that stops before (every checkpoint damaged) changes nothing.
        with write_replacing(os.path.join(cfg.output_dir, "config.yaml")) as f:
            f.write(config_yaml)
        where = f"resumed from step {resumed}" if resumed is not None else "from scratch"
        engine = engine_name(cfg)
        print(
            f"run {cfg.name}: {runtime.world_size} process(es) on {runtime.device} ({engine}, "
            f"precision {cfg.train.mixed_precision}, kernels {steps.kernel_status}, "
            f"capture {steps.capture_status}), {where}; "
            f"data {dataset.describe()}; "
            f"folder {cfg.output_dir}",
            flush=True,
        )
        if trainer.state.lr_horizon != cfg.train.steps and cfg.train.lr_final_factor != 1.0:
            print(
                f"the learning-rate schedule keeps this run's horizon of {trainer.state.lr_horizon} steps "
                f"(train.steps is now {cfg.train.steps}); past it the rates stay at their final value",
                flush=True,
            )
    if prometheus is not None and (runtime.is_main or prometheus.moved_from is not None):
        moved = f" (port {prometheus.moved_from} was taken)" if prometheus.moved_from is not None else ""
        target = f"; target file {prometheus.target_file}" if prometheus.target_file else ""
        print(f"prometheus metrics: {prometheus.url}{moved}{target}", flush=True)
    clean = False
    try:
        final = trainer.train()
        clean = True
    except (Preempted, StopRequested, KeyboardInterrupt):
        clean = True  # stopped on request (to be requeued): not a crash for the alerts
        raise
    finally:
        stream.close()  # the next epoch's readers, when they were opened ahead
        logger.close(clean)
    if runtime.is_main:
        summary = {
            k: v for k, v in final.items() if k.startswith("eval_") or k.endswith("loss") or k == "ranks_in_sync"
        }
        latest = os.path.join(cfg.output_dir, "eval", "latest.json")
        if resumed == cfg.train.steps and os.path.isfile(latest):
            # Nothing left to train: show the finished run's last evaluation.
            with open(latest) as f:
                summary.update({f"eval_{k}": v for k, v in json.load(f).items() if k != "settings"})
        print(f"\nfinished: {cfg.output_dir}\n{strict_json.dumps(summary, indent=2)}", flush=True)
    return final
