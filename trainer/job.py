"""The training job: every component built from the configuration (runtime, data, networks, steps,
stream, sinks, checkpoints, evaluator), the run folder locked, then the loop run. trainer/main.py is
the command line in front of it."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
from functools import partial

import fsspec
import torch

from data_pipeline import storage
from data_pipeline.convert import convert_toy
from data_pipeline.shards import DataError, manifest_url
from data_pipeline.storage import StopRequested
from data_pipeline.stream import ShardStream, looks_like_shards, open_data
from models import build_networks
from trainer.checkpoint import Checkpoints, load_export, package_version
from trainer.config import ConfigError, RunConfig, config_from_yaml, config_to_yaml, vera_settings
from trainer.evaluation import build_evaluator
from trainer.meg_trainer import MEGTrainer, Preempted, host_pinning
from trainer.metrics import JsonlSink, MetricsLogger, ProgressSink
from trainer.nofollow import check_run_folder, write_replacing
from trainer.prometheus import PrometheusExporter
from trainer.run_folder import RunFolderBusy, RunFolderLock
from trainer.runtime import Runtime, build_runtime, collective_failure
from trainer.steps import build_steps, resolve_kernels

log = logging.getLogger("meg")


def data_location(url: str) -> str:
    """What to call the data in messages: the shards as given, or the manifest a folder holds."""
    return url if looks_like_shards(url) else manifest_url(url)


def engine_name(cfg: RunConfig) -> str:
    """The engine as the start-up line and the metrics' run info name it: ddp, deepspeed ZeRO-2."""
    return cfg.train.engine + (f" ZeRO-{cfg.deepspeed.zero_stage}" if cfg.train.engine == "deepspeed" else "")


def ensure_toy_data(cfg: RunConfig, runtime: Runtime) -> None:
    """Toy presets write their shards on first use, so the default job needs no download: only into
    a folder that does not exist yet or is empty. Anything else (a manifest that is there but wrong,
    a missing shard, other files) is the user's data and is reported by read_manifest, not overwritten."""
    if cfg.data.toy and runtime.is_main and not looks_like_shards(cfg.data.url):
        fs, manifest = fsspec.core.url_to_fs(manifest_url(cfg.data.url))
        if not storage.bounded(partial(fs.exists, manifest), manifest, "lookup"):
            folder = posixpath.dirname(manifest)
            if storage.bounded(partial(_non_empty, fs, folder), folder, "listing"):
                raise DataError(
                    f"data.url={cfg.data.url} holds files but no manifest.json: not writing {cfg.data.toy} shards "
                    "over them. Point data.url at an empty or new folder (or at the data's manifest)."
                )
            log.info("writing %s shards to %s", cfg.data.toy, cfg.data.url)
            convert_toy(
                cfg.data.toy,
                cfg.data.url,
                cfg.data.toy_num_samples,
                cfg.data.toy_num_shards,
                seed=cfg.train.seed,
                std=cfg.data.toy_std,
            )
    runtime.barrier()


def _non_empty(fs, folder: str) -> bool:
    return fs.exists(folder) and bool(fs.ls(folder))


def build_logger(cfg: RunConfig, runtime: Runtime, preset: str) -> tuple[MetricsLogger, PrometheusExporter | None]:
    sinks = []
    if runtime.is_main:
        sinks.append(JsonlSink(os.path.join(cfg.output_dir, "metrics.jsonl")))
        if cfg.log.progress:
            sinks.append(ProgressSink(cfg.train.steps))
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
        )
        sinks.append(prometheus)
    return MetricsLogger(sinks), prometheus


def run(cfg: RunConfig, stop: threading.Event, preset: str = "") -> dict[str, float]:
    """``preset``: the --config it came from, for the metrics' run info."""
    # Every storage call from here on is bounded by data.io_timeout and ends on a stop request.
    storage.configure(timeout=cfg.data.io_timeout, stop=stop)
    check_run_folder(cfg.output_dir)  # links where the run writes: refused before any work
    runtime = build_runtime(cfg)
    meet = True
    try:
        # Everything that holds the process group (DDP wrappers, engines) lives in train() and is
        # released when it returns, before the group is destroyed.
        return train(cfg, runtime, stop, preset)
    except Preempted as e:
        meet = e.checkpointed
        raise
    except StopRequested:  # while waiting on storage outside the training loop (start-up, evaluation)
        meet = False
        raise Preempted("stop signal received while waiting for storage; the newest checkpoint stands", False) from None
    except RuntimeError as e:
        failed = collective_failure(e, runtime, cfg.train.collective_timeout)
        if failed is None:
            raise
        meet = False  # the other ranks are gone or stopped: meeting them would wait for the timeout again
        raise failed from None
    finally:
        runtime.shutdown(meet)


def check_resumable(cfg: RunConfig, checkpoint: str, sample_shape: list[int]) -> None:
    """Raises ConfigError when the run asks for another model, engine or data shape than the
    checkpoint it would resume holds: before anything of the run folder is overwritten."""
    _, info, saved_yaml = load_export(checkpoint)
    saved = config_from_yaml(saved_yaml, os.path.join(checkpoint, "config.yaml"))
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
    if list(info["sample_shape"]) != list(sample_shape):
        differences.append(f"sample shape: {info['sample_shape']} in the checkpoint, {sample_shape} in data.url now")
    if differences:
        raise ConfigError(
            f"cannot resume {checkpoint}: " + "; ".join(differences) + ". Resume with the run's own settings, "
            "or train into another output_dir (or set checkpoint.resume=false to start over in this one)."
        )


def train(cfg: RunConfig, runtime: Runtime, stop: threading.Event, preset: str) -> dict[str, float]:
    if cfg.data.batch_size % runtime.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {runtime.world_size} ranks")
    ensure_toy_data(cfg, runtime)
    try:
        manifest = open_data(cfg.data.url, cfg.data.decode_spec(), cfg.data.sample_bytes_bound())
    except DataError as e:
        raise DataError(
            f"{e}\nthis preset's data is written by: {cfg.data.prepare}" if cfg.data.prepare else str(e)
        ) from None
    config_yaml = config_to_yaml(cfg)
    info = {
        "sample_shape": list(manifest.sample_shape),
        "dataset": manifest.name,
        "data_url": data_location(cfg.data.url),
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
    if resume_from is not None:
        check_resumable(cfg, resume_from, info["sample_shape"])
    if runtime.is_main:
        with write_replacing(os.path.join(cfg.output_dir, "config.yaml")) as f:
            f.write(config_yaml)
    runtime.barrier()
    try:
        return _train(cfg, runtime, stop, manifest, checkpoints, resume_from, preset)
    finally:
        lock.release()


def _train(
    cfg, runtime, stop, manifest, checkpoints: Checkpoints, resume_from: str | None, preset: str
) -> dict[str, float]:
    runtime.seed(cfg.train.seed, per_rank=False)  # identical initial networks on every rank
    try:
        nets = build_networks(
            cfg.model, tuple(manifest.sample_shape), resolve_kernels(cfg, runtime), vera_settings(cfg)
        )
    except ValueError as e:  # the models know no config errors: an architecture that cannot take this data
        raise ConfigError(f"model.arch={cfg.model.arch}: {e}") from None
    runtime.seed(cfg.train.seed, per_rank=True)  # different noise on each rank
    steps = build_steps(cfg, runtime, nets)
    stream = ShardStream(
        manifest,
        runtime.rank,
        runtime.world_size,
        cfg.data.batch_size // runtime.world_size,
        cfg.data.num_workers,
        cfg.data.shuffle_buffer,
        cfg.train.seed,
        worker_type=cfg.data.worker_type,
        max_corrupt_share=cfg.data.max_corrupt_share,
        read_ahead=True,
        pin=host_pinning(runtime.device),
    )
    logger, prometheus = build_logger(cfg, runtime, preset)
    evaluator = build_evaluator(cfg, manifest.sample_shape, manifest.name)
    trainer = MEGTrainer(cfg, runtime, steps, stream, logger, checkpoints, evaluator, stop)
    resumed = trainer.resume_if_possible(resume_from)
    if runtime.is_main:
        where = f"resumed from step {resumed}" if resumed is not None else "from scratch"
        engine = engine_name(cfg)
        print(
            f"run {cfg.name}: {runtime.world_size} process(es) on {runtime.device} ({engine}, "
            f"precision {cfg.train.mixed_precision}, kernels {steps.kernel_status}, "
            f"capture {steps.capture_status}), {where}; "
            f"data {data_location(cfg.data.url)} ({manifest.num_samples} samples, {len(manifest.shards)} shards"
            f"{', indexed now' if looks_like_shards(cfg.data.url) else ''}); "
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
    except (Preempted, KeyboardInterrupt):
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
                summary.update({f"eval_{k}": v for k, v in json.load(f).items()})
        print(f"\nfinished: {cfg.output_dir}\n{json.dumps(summary, indent=2)}", flush=True)
    return final
