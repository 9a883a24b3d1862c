"""Prometheus: the run's metrics as operators scrape them, the target files that make the ranks
discoverable, and the final numbers pushed to a Pushgateway so they outlive the process.

Naming follows the Prometheus guide: one ``meg_`` prefix, base units (seconds, bytes), ``_total``
counters. A value reduced over ranks (losses, steps, samples) is exported once, by rank 0, with a
``run`` label; a quantity of one process (data wait, corrupt shards, memory, CPU) carries ``rank``
too. Counters start from 0 with each process: Prometheus treats that as a counter reset, so a
resumed run's rates show no jump; ``meg_step`` is the gauge that says where the run is.

Discovery: each rank listens on ``log.prometheus_port`` + its local rank and, when
``log.prometheus_targets`` names a folder, writes ``<run>-<folder hash>-rank<r>.json`` there
(Prometheus file_sd). The file is removed when the process ends cleanly (finished or stopped to be
requeued) and left behind when it crashes, so the target turns ``up == 0`` and MEGTargetDown fires.

A run is its name and its output folder: runs of a sweep share the name and differ in the folder.
The folder (absolute) is the ``run_folder`` label, added by the target file to every scraped series
and by the Pushgateway grouping key to every pushed one, so two such runs never share a target
file, a pushed group or a dashboard line; a requeued run keeps its folder and so all three.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import resource
import socket
import sys
import tempfile
import time

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    push_to_gateway,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainer.config import ConfigError, normalise_gateway
from trainer.metrics import MetricSink, RankStats

# The *_created series double every counter's series for a timestamp nobody graphs.
disable_created_metrics()

# The window metrics exported as gauges: JSONL name -> (Prometheus name, help).
WINDOW_GAUGES = {
    "energy_loss": ("meg_energy_loss", "Energy loss E(real) - E(fake) + penalty, mean over the last log window"),
    "generator_loss": ("meg_generator_loss", "Generator loss E(G(z)) - entropy_weight * MI, mean over the last window"),
    "energy_gap": ("meg_energy_gap", "E(fake) - E(real), mean over the last window; large |gap| means divergence"),
    "penalty": ("meg_gradient_penalty", "Zero-centred gradient penalty on the data, mean over the last window"),
    "mi_estimate": ("meg_mi_estimate", "JSD mutual-information estimate I(G(z); z) (the entropy term), last window"),
    "sample_spread": (
        "meg_sample_spread",
        "Per-dimension std of generated samples, averaged; near 0 means the generator collapsed",
    ),
    "lr_energy": ("meg_energy_learning_rate", "Energy network learning rate at the last window"),
    "lr_generator": (
        "meg_generator_learning_rate",
        "Generator and statistics network learning rate at the last window",
    ),
}
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PUSH_JOB = "meg"  # the Pushgateway job; the run and its folder are the rest of the grouping key
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
GPU_MEMORY = {  # meg_gpu_memory_<name>_bytes: reader, help
    "allocated": (torch.cuda.memory_allocated, "GPU memory held by tensors"),
    "reserved": (torch.cuda.memory_reserved, "GPU memory reserved by the caching allocator"),
    "peak": (torch.cuda.max_memory_allocated, "peak GPU memory held by tensors since the process started"),
}


def node_name() -> str:
    """This node as Slurm names it, else its hostname. Not getfqdn(): where /etc/hosts maps the
    hostname to 127.0.0.1 (containers, cloud images) that is ``localhost``, and it may wait on DNS."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def advertised_host(addr: str) -> str:
    """The host a scraper should use: the listening address, or this node's name for a wildcard."""
    return node_name() if addr in WILDCARD_ADDRESSES else addr


def loopback_only(host: str) -> list[str]:
    """The addresses ``host`` resolves to here when all of them are loopback, else []."""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except OSError:  # unknown here; the scraper's resolver may still know it
        return []
    # An IPv6 address may carry its interface (fe80::1%eth0), which ip_address refuses.
    return addresses if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses) else []


class ProcessCollector:
    """This process's resident memory and CPU seconds, and the CUDA allocator's memory, read at scrape time."""

    def __init__(self, run: str, rank: int, device: torch.device):
        self.labels = [run, str(rank)]
        self.device = device if device.type == "cuda" else None
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    def _rss_bytes(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return float(int(f.read().split()[1]) * self.page_size)
        except OSError:  # not Linux: the peak is what getrusage offers (KiB on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return float(peak if sys.platform == "darwin" else peak * 1024)

    def collect(self):
        names = ["run", "rank"]
        memory = GaugeMetricFamily("meg_process_resident_memory_bytes", "Resident memory of this rank", labels=names)
        memory.add_metric(self.labels, self._rss_bytes())
        cpu = CounterMetricFamily("meg_process_cpu_seconds", "CPU time (user + system) of this rank", labels=names)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.add_metric(self.labels, usage.ru_utime + usage.ru_stime)
        yield memory
        yield cpu
        if self.device is not None:
            for name, (read, help) in GPU_MEMORY.items():
                gauge = GaugeMetricFamily(f"meg_gpu_memory_{name}_bytes", help, labels=names)
                gauge.add_metric(self.labels, float(read(self.device)))
                yield gauge


# The target files of this process's exporters, until closed: a process that stops to be requeued
# without closing them (trainer/main.py's exit_now) withdraws them, or the alerts take it for down.
_open_target_files: set[str] = set()


def withdraw_target_files() -> None:
    """Removes the target files of the exporters not closed (the process stops to be requeued)."""
    for path in list(_open_target_files):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        _open_target_files.discard(path)


class PrometheusExporter(MetricSink):
    """A metrics sink (see trainer/metrics.py) serving this rank's ``/metrics``; on rank 0 it also
    holds the run-wide metrics and pushes the final numbers to ``log.pushgateway``."""

    def __init__(
        self,
        cfg,
        run: str,
        rank: int,
        local_rank: int,
        device: torch.device,
        target_steps: int,
        samples_per_step: int,
        info: dict[str, str],
        run_folder: str = "",
    ):
        """``run_folder``: the run's output folder (default: the working folder)."""
        self.cfg, self.run, self.rank, self.samples_per_step = cfg, run, rank, samples_per_step
        self.run_folder = os.path.abspath(run_folder)
        self.main = rank == 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.final = CollectorRegistry(auto_describe=True)  # what is pushed: the numbers that outlive the run
        self.gateway = normalise_gateway(cfg.pushgateway) if cfg.pushgateway else ""
        self._push_error = ""
        self._last_step = 0
        self.registry.register(ProcessCollector(run, rank, device))
        per_rank = ["run", "rank"]
        self.data_wait = Counter(
            "meg_data_wait_seconds", "Time this rank waited for its next batch", per_rank, registry=self.registry
        ).labels(run, str(rank))
        self.corrupt_shards = Counter(
            "meg_corrupt_shards", "Unreadable shards this rank skipped", per_rank, registry=self.registry
        ).labels(run, str(rank))
        self._corrupt_seen = 0
        if self.main:
            self._build_run_metrics(target_steps, info)
        self.port, self.moved_from = self._serve(cfg.prometheus_port + local_rank if cfg.prometheus_port else 0)
        if local_rank == 0:  # once per node: every rank there advertises the same name
            self._warn_if_advertised_host_is_loopback()
        self.target_file = self._write_target() if cfg.prometheus_targets else ""
        if self.target_file:
            _open_target_files.add(self.target_file)

    def _counter(self, name: str, help: str) -> Counter:
        return Counter(name, help, ["run"], registry=self.registry).labels(self.run)

    def _gauge(self, name: str, help: str, pushed: bool = False, until_set: bool = False):
        """A gauge of the run; ``until_set``: its series appears when first set (not as 0 before)."""
        gauge = Gauge(name, help, ["run"], registry=self.registry)
        if pushed:
            self.final.register(gauge)
        return gauge if until_set else gauge.labels(self.run)

    def _build_run_metrics(self, target_steps: int, info: dict[str, str]) -> None:
        self.steps = self._counter("meg_steps", "Training iterations completed by this process (resets on restart)")
        self.samples = self._counter("meg_samples", "Training samples consumed by this process (all ranks)")
        self.skipped = self._counter("meg_skipped_steps", "fp16 updates skipped by the loss scaler (overflow)")
        self.rollbacks = self._counter("meg_rollbacks", "Divergence rollbacks to the last checkpoint")
        self.nonfinite = self._counter("meg_nonfinite_events", "Windows in which a metric went non-finite")
        self.step = self._gauge("meg_step", "Current training step of the run (kept across restarts)", pushed=True)
        self.target = self._gauge("meg_target_steps", "The run's train.steps", pushed=True)
        self.target.set(target_steps)
        self.last_step_time = self._gauge(
            "meg_last_step_timestamp_seconds", "When the last log window (or evaluation, which pauses training) ended"
        )
        # The stall alert holds its fire while it is 1: an evaluation (FID of 50k samples, MALA) may take
        # longer than its 15 minutes, and train.evaluation_timeout ends one that hangs.
        self.evaluating_now = self._gauge("meg_evaluating", "1 while the main process evaluates, else 0")
        self.last_checkpoint_time = self._gauge(
            "meg_last_checkpoint_timestamp_seconds", "When the last checkpoint was saved (or the process started)"
        )
        # Timestamps, not only the counters: increase() misses a rollback made before the first
        # scrape, when the counter's first sample is already 1.
        self.last_rollback_time = self._gauge(
            "meg_last_rollback_timestamp_seconds", "When the last divergence rollback happened (0: none)", pushed=True
        )
        self.last_nonfinite_time = self._gauge(
            "meg_last_nonfinite_timestamp_seconds",
            "When a non-finite metric or weight last caused a rollback (0: never)",
            pushed=True,
        )
        self.last_eval_time = self._gauge(
            "meg_last_eval_timestamp_seconds", "When the last evaluation ended", pushed=True, until_set=True
        )
        self.eval_step = self._gauge("meg_eval_step", "Step of the last evaluation", pushed=True, until_set=True)
        eval_result = Gauge(
            "meg_eval_result",
            "Last evaluation's results, one series per metric (e.g. fid, high_quality_share, auprc)",
            ["run", "metric"],
            registry=self.registry,
        )
        self.final.register(eval_result)
        self.eval_result = eval_result
        self.step_duration = Histogram(
            "meg_step_duration_seconds",
            "Wall time of one training iteration (energy, generator and MI updates)",
            ["run"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        ).labels(self.run)
        self.window = {key: self._gauge(name, help, until_set=True) for key, (name, help) in WINDOW_GAUGES.items()}
        run_info = Info(
            "meg_run", "The run's preset, engine, precision, world size and package version", ["run"], registry=None
        )
        self.registry.register(run_info)
        self.final.register(run_info)
        run_info.labels(self.run).info(info)
        now = time.time()
        self.last_step_time.set(now)
        self.last_checkpoint_time.set(now)

    def _serve(self, port: int) -> tuple[int, int | None]:
        addr = self.cfg.prometheus_addr
        try:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
            moved_from = None
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # an address that is not this node's, a name that does not resolve
                raise ConfigError(
                    f"log.prometheus_addr={addr}: cannot serve metrics there on port {port} ({e.strerror or e}); "
                    "use 127.0.0.1, 0.0.0.0 (every interface) or one of this node's addresses"
                ) from None
            # The port is taken (another run on this node): serve on a free one; the target file
            # registers where it moved, and the start-up line says so.
            server, _ = start_http_server(0, addr=addr, registry=self.registry)
            moved_from = port
        self.server = server
        return server.server_port, moved_from

    @property
    def url(self) -> str:
        return f"http://{advertised_host(self.cfg.prometheus_addr)}:{self.port}/metrics"

    def _warn_if_advertised_host_is_loopback(self) -> None:
        if self.cfg.prometheus_addr not in WILDCARD_ADDRESSES:
            return
        host = advertised_host(self.cfg.prometheus_addr)
        if addresses := loopback_only(host):
            print(
                f"warning: this node's name {host} resolves to {', '.join(addresses)} here, so a Prometheus on "
                "another host cannot scrape it; set log.prometheus_addr to this node's reachable address",
                file=sys.stderr,
                flush=True,
            )

    @property
    def grouping_key(self) -> dict[str, str]:
        return {"run": self.run, "run_folder": self.run_folder}

    def _write_target(self) -> str:
        folder = self.cfg.prometheus_targets
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(
                f"log.prometheus_targets={folder} is a file: it names the folder Prometheus's file_sd_configs "
                "reads target files from"
            )
        os.makedirs(folder, exist_ok=True)
        folder_hash = hashlib.sha256(self.run_folder.encode()).hexdigest()[:8]
        path = os.path.join(folder, f"{self.run}-{folder_hash}-rank{self.rank}.json")
        labels = {**self.grouping_key, "rank": str(self.rank), "node": node_name(), "job": PUSH_JOB}
        if os.environ.get("SLURM_JOB_ID"):
            labels["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        entry = [{"targets": [f"{advertised_host(self.cfg.prometheus_addr)}:{self.port}"], "labels": labels}]
        # Written whole and renamed: Prometheus watches the folder and must never read half a file.
        # Not *.json while written: file_sd's glob (Go's, where * matches a leading dot) would read it.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    # -- the sink interface (trainer/metrics.py) --

    def resumed_at(self, step: int) -> None:
        """The run starts (or resumes) at ``step``: counters count from here, the gauge says where.
        Pushed at once: the dashboard's max over live and pushed steps would show an older process's
        later step (one that crashed after its last checkpoint) until the next evaluation."""
        self._last_step = step
        if self.main:
            self.step.set(step)
            self.push()

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        if metrics.get("event") == "rollback":
            self.rollbacks.inc()
            self.last_rollback_time.set(time.time())
            if metrics.get("nonfinite"):
                self.nonfinite.inc()
                self.last_nonfinite_time.set(time.time())
            self._last_step = step  # the steps redone after the rollback count again
            self.step.set(step)
            self.push()  # else the pushed pre-rollback step outranks the live one on the dashboard
            return
        evals = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_")}
        if evals:
            for name, value in evals.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.eval_result.labels(self.run, name).set(value)
            self.eval_step.labels(self.run).set(step)
            self.last_eval_time.labels(self.run).set(time.time())
        for key, gauge in self.window.items():
            if key in metrics:
                gauge.labels(self.run).set(metrics[key])
        if "samples_per_s" in metrics:  # a log window
            self.skipped.inc(metrics.get("skipped_steps", 0))
            self.last_step_time.set(time.time())
        if step > self._last_step:
            self.steps.inc(step - self._last_step)
            self.samples.inc((step - self._last_step) * self.samples_per_step)
            self._last_step = step
        self.step.set(step)
        if evals:
            self.push()

    def rank_stats(self, stats: RankStats) -> None:
        self.data_wait.inc(stats.data_wait_s)
        self.corrupt_shards.inc(stats.corrupt_shards - self._corrupt_seen)
        self._corrupt_seen = stats.corrupt_shards
        if self.main:
            for duration in stats.step_durations:
                self.step_duration.observe(duration)

    def checkpointed(self, step: int) -> None:
        if self.main:
            self.last_checkpoint_time.set(time.time())

    def evaluating(self, running: bool) -> None:
        if self.main:
            self.evaluating_now.set(int(running))
            if not running:  # training goes on from now: the stall clock starts again
                self.last_step_time.set(time.time())

    def push(self) -> None:
        """The final numbers to the Pushgateway (rank 0), replacing the run's group; a failure is
        reported once per distinct error and never stops training."""
        if not (self.main and self.gateway):
            return
        try:
            push_to_gateway(self.gateway, job=PUSH_JOB, grouping_key=self.grouping_key, registry=self.final, timeout=5)
            self._push_error = ""
        except Exception as e:  # noqa: BLE001 (a gateway that answers garbage raises http.client's errors, not OSError)
            said = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
            if said != self._push_error:
                self._push_error = said
                print(f"warning: could not push metrics to {self.gateway}: {said}", file=sys.stderr, flush=True)

    def close(self, clean: bool = True) -> None:
        """Pushes the final numbers and stops serving. ``clean``: the process finished or stopped to
        be requeued, so its target file goes; after a crash it stays, and Prometheus reports it down."""
        self.push()
        self.server.shutdown()
        self.server.server_close()
        if self.target_file:
            _open_target_files.discard(self.target_file)
            if clean:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.target_file)
            else:
                print(
                    f"left {self.target_file} so that Prometheus reports rank {self.rank} down "
                    "(MEGTargetDown); delete it once the run is dealt with",
                    file=sys.stderr,
                    flush=True,
                )
