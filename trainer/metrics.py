"""Metric sinks: computation (the trainer) is separate from where numbers go.

- JSONL file in the run folder (main process): one object per log interval, eval and event.
- Prometheus endpoint per rank (prometheus-client, 127.0.0.1 by default) for Grafana.
- A live progress line (main process): step, losses, samples/s, ETA.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self) -> None:
        self.file.close()


class PrometheusSink:
    """Serves ``meg_<metric>`` gauges labelled with the run and rank, plus a step counter."""

    def __init__(self, port: int, addr: str, run: str, rank: int):
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "rank": str(rank)}
        self.gauges: dict[str, Gauge] = {}
        self.steps = Counter("meg_steps", "Generator steps completed", ["run", "rank"], registry=self.registry)
        self.steps_child = self.steps.labels(**self.labels)
        self._last_step = 0
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError:
            # Another run holds the port: serve on a free one rather than fail the job.
            self.server, _ = start_http_server(0, addr=addr, registry=self.registry)
        self.port = self.server.server_port

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            gauge = self.gauges.get(name)
            if gauge is None:
                gauge = Gauge(f"meg_{name}", f"MEG metric {name}", ["run", "rank"], registry=self.registry)
                self.gauges[name] = gauge
            gauge.labels(**self.labels).set(value)
        if step > self._last_step:
            self.steps_child.inc(step - self._last_step)
            self._last_step = step

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressSink:
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
            f"step {step}/{self.total} {losses} | {metrics['samples_per_s']:.0f} samples/s | ETA {_fmt_duration(eta)}"
        )
        self.stream.write(("\r\033[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


class MetricsLogger:
    """Fans one call out to every sink."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
