"""Trains an energy-based model with a Maximum Entropy Generator (MEG).

One process:                 python trainer/main.py --config toy_25gaussians train.steps=2000
Through accelerate:          accelerate launch trainer/main.py --config toy_25gaussians
Two CPU processes (one DDP group; plain --cpu starts only one process):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians
DeepSpeed ZeRO-2 on two processes (ZeRO 0/1/2; ZeRO-3 is refused: see trainer/runtime/deepspeed_engine.py):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config toy_25gaussians \
        train.engine=deepspeed deepspeed.zero_stage=2 deepspeed.config_file=deploy/deepspeed/zero2.json
Mixed precision: train.mixed_precision=bf16 or fp16 (fp16: dynamic loss scaling, overflowing steps skipped).
Several nodes: see deploy/ (accelerate configs and SLURM scripts).

Overrides are dotted ``section.key=value`` pairs; ``--print-config`` shows every key. A run folder
holds config.yaml, metrics.jsonl, checkpoints/ and eval/; a restarted run resumes from its latest
checkpoint unless ``checkpoint.resume=false``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from data_pipeline.convert import convert_toy
from data_pipeline.shards import DataError, manifest_url, read_manifest
from data_pipeline.stream import ShardStream
from models import build_networks
from trainer.checkpoint import Checkpoints
from trainer.config import ConfigError, RunConfig, config_to_yaml, load_config
from trainer.evaluation import build_evaluator, check_requirements
from trainer.guard import Diverged
from trainer.meg_trainer import PREEMPTED_EXIT_CODE, MEGTrainer, Preempted
from trainer.metrics import JsonlSink, MetricsLogger, ProgressSink, PrometheusSink
from trainer.runtime import LaunchError, Runtime, build_runtime
from trainer.steps import build_steps, resolve_kernels

log = logging.getLogger("meg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a YAML preset: a path, or a name in configs/ (e.g. toy_25gaussians)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")
    return parser


def ensure_toy_data(cfg: RunConfig, runtime: Runtime) -> None:
    """Toy presets write their shards on first use, so the default job needs no download."""
    if cfg.data.toy and runtime.is_main:
        try:
            read_manifest(cfg.data.url)
        except DataError:
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


def build_logger(cfg: RunConfig, runtime: Runtime) -> tuple[MetricsLogger, PrometheusSink | None]:
    sinks = []
    if runtime.is_main:
        sinks.append(JsonlSink(os.path.join(cfg.output_dir, "metrics.jsonl")))
        if cfg.log.progress:
            sinks.append(ProgressSink(cfg.train.steps))
    prometheus = None
    if cfg.log.prometheus_port >= 0:
        port = cfg.log.prometheus_port + runtime.rank if cfg.log.prometheus_port else 0
        prometheus = PrometheusSink(port, cfg.log.prometheus_addr, cfg.name, runtime.rank)
        sinks.append(prometheus)
    return MetricsLogger(sinks), prometheus


@contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """SIGUSR1 and SIGTERM (Slurm's warning before the time limit, a scheduler's preemption) set the
    event; the trainer checkpoints at its next metric reduction and the process exits with code 75.
    The previous handlers come back when the block ends."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(cfg: RunConfig) -> dict[str, float]:
    runtime = build_runtime(cfg)
    try:
        # Everything that holds the process group (DDP wrappers, engines) lives in train() and is
        # released when it returns, before the group is destroyed.
        with stop_signals() as stop:
            return train(cfg, runtime, stop)
    finally:
        runtime.shutdown()


def train(cfg: RunConfig, runtime: Runtime, stop: threading.Event) -> dict[str, float]:
    if cfg.data.batch_size % runtime.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the {runtime.world_size} ranks")
    ensure_toy_data(cfg, runtime)
    try:
        manifest = read_manifest(cfg.data.url)
    except DataError as e:
        raise DataError(
            f"{e}\nthis preset's data is written by: {cfg.data.prepare}" if cfg.data.prepare else str(e)
        ) from None
    config_yaml = config_to_yaml(cfg)
    if runtime.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
    runtime.barrier()

    runtime.seed(cfg.train.seed, per_rank=False)  # identical initial networks on every rank
    nets = build_networks(cfg.model, tuple(manifest.sample_shape), resolve_kernels(cfg.model.kernels, runtime.device))
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
    )
    logger, prometheus = build_logger(cfg, runtime)
    info = {
        "sample_shape": list(manifest.sample_shape),
        "dataset": manifest.name,
        "data_url": manifest_url(cfg.data.url),
    }
    checkpoints = Checkpoints(os.path.join(cfg.output_dir, "checkpoints"), cfg.checkpoint.keep, config_yaml, info)
    evaluator = build_evaluator(cfg, manifest.sample_shape, manifest.name)
    trainer = MEGTrainer(cfg, runtime, steps, stream, logger, checkpoints, evaluator, stop)
    resumed = trainer.resume_if_possible()
    if runtime.is_main:
        where = f"resumed from step {resumed}" if resumed is not None else "from scratch"
        engine = cfg.train.engine + (f" ZeRO-{cfg.deepspeed.zero_stage}" if cfg.train.engine == "deepspeed" else "")
        print(
            f"run {cfg.name}: {runtime.world_size} process(es) on {runtime.device} ({engine}, "
            f"precision {cfg.train.mixed_precision}, kernels {steps.kernel_status}, "
            f"capture {steps.capture_status}), {where}; "
            f"data {manifest_url(cfg.data.url)} ({manifest.num_samples} samples, {len(manifest.shards)} shards); "
            f"folder {cfg.output_dir}",
            flush=True,
        )
        if trainer.state.lr_horizon != cfg.train.steps and cfg.train.lr_final_factor != 1.0:
            print(
                f"the learning-rate schedule keeps this run's horizon of {trainer.state.lr_horizon} steps "
                f"(train.steps is now {cfg.train.steps}); past it the rates stay at their final value",
                flush=True,
            )
        if prometheus is not None:
            print(f"prometheus metrics: http://{cfg.log.prometheus_addr}:{prometheus.port}/metrics", flush=True)
    try:
        final = trainer.train()
    finally:
        logger.close()
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every save
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        check_requirements(cfg)  # every file the evaluation reads, before any work
        run(cfg)
    except (ConfigError, DataError, LaunchError, Diverged, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
