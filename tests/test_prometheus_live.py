"""The monitoring stack against a real Prometheus and Pushgateway (Debian's, run on 127.0.0.1): the
shipped prometheus.yml, pointed at a temporary file_sd folder, discovers a 2-rank run through its
target files; every dashboard query and every alert's inner query returns data; a scrape passes
`promtool check metrics`; a resumed run's step counter restarts instead of jumping; the final
evaluation stays visible (Pushgateway) after the processes exit, on the same dashboard line as the
live series (both labelled with the run's folder); a killed run shows as up == 0."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, accelerate_launcher, run_trainer, tiny_overrides
from tests.test_deploy import _dashboard_queries

BINARIES = ("prometheus", "prometheus-pushgateway", "promtool")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(b) is None for b in BINARIES) and os.environ.get("CI") != "true",
        reason="prometheus or its pushgateway not installed (deploy/ci/install-system-packages.sh; CI requires them)",
    ),
]
RUN = "livetest"
STEPS = 800  # per training process: the first run trains 0..800, the resumed one 800..1600
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval at a 1 s scrape interval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Servers:
    """Prometheus with the shipped config (intervals shortened to 1 s) and a Pushgateway."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []
        self.targets = folder / "targets"
        self.targets.mkdir(parents=True)
        self.gateway = f"127.0.0.1:{free_port()}"
        self.prometheus = f"127.0.0.1:{free_port()}"
        config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for job in config["scrape_configs"]:
            for sd in job.get("file_sd_configs", []):
                sd["refresh_interval"] = "1s"
            if job["job_name"] == "meg-pushgateway":
                job["static_configs"] = [{"targets": [self.gateway]}]
        # The shipped file_sd path (targets/*.json) and rule file are relative to the config: beside it here.
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(REPO_ROOT / "deploy/prometheus/alerts.yml", folder / "alerts.yml")

    def start(self) -> None:
        log = open(self.folder / "servers.log", "w")
        self.procs.append(
            # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: earlier tests'
            # groups (other run folders) would come back. This one keeps its own.
            subprocess.Popen(
                [
                    "prometheus-pushgateway",
                    f"--web.listen-address={self.gateway}",
                    f"--persistence.file={self.folder / 'pushgateway.data'}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        self.procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.folder / 'tsdb'}",
                    f"--web.listen-address={self.prometheus}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        )
        for address in (self.gateway, self.prometheus):
            wait_for(lambda a=address: self._ready(a), 30, f"{address} to be ready")

    @staticmethod
    def _ready(address: str) -> bool:
        try:
            return urllib.request.urlopen(f"http://{address}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def query_count(self, expr: str, count: int) -> list[dict] | None:
        """The instant query's series once there are ``count`` of them, else None."""
        result = self.query(expr)
        return result if len(result) == count else None

    def query(self, expr: str, start: float | None = None, end: float | None = None) -> list[dict]:
        """An instant query (``start`` None) or a range query at a 1 s step: the API's result list."""
        if start is None:
            params = {"query": expr}
            path = "query"
        else:
            params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
            path = "query_range"
        url = f"http://{self.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.fixture
def servers(tmp_path):
    stack = Servers(tmp_path / "monitoring")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()  # by PID, whatever happened


def training_args(tmp_path: Path, stack: Servers, steps: int) -> list[str]:
    args = [o for o in tiny_overrides(tmp_path, steps=steps) if not o.startswith(("log.", "eval.every", "checkpoint."))]
    return args + [
        f"name={RUN}",
        "log.every=10",
        "checkpoint.every=100",
        "eval.every=250",
        "eval.mala.steps=3",
        "log.prometheus_port=0",
        f"log.prometheus_targets={stack.targets}",
        f"log.pushgateway=http://{stack.gateway}",
    ]


def scrape_once_trained(url: str) -> bytes | None:
    """The endpoint's body once the first log window has been exported (its step histogram), else None."""
    body = urllib.request.urlopen(url, timeout=5).read()
    return body if b"meg_data_wait_seconds_total" in body and b"meg_process_cpu_seconds_total" in body else None


def alert_inner_queries() -> list[str]:
    """Each alert's expression without its final comparison: the series it watches; one query per side
    of an ``unless`` (the stall alert's, held while an evaluation runs)."""
    rules = yaml.safe_load((REPO_ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    sides = [side.strip() for r in rules for side in re.split(r"\bunless\s+on\s*\([^)]*\)", r["expr"])]
    sides = [side[1:-1] if side.startswith("(") and side.endswith(")") else side for side in sides]
    inner = [re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$", "", side) for side in sides]
    assert len(inner) > len(rules) and all(q != side for q, side in zip(inner, sides)), inner
    return inner


def test_real_prometheus_scrapes_a_two_rank_run_and_every_query_returns_data(tmp_path, servers):
    launcher, env = accelerate_launcher(2)
    started = time.time()

    # 1. A 2-rank run, scraped while it trains: both ranks discovered through their target files.
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", *training_args(tmp_path, servers, STEPS)]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        files = wait_for(
            lambda: sorted(servers.targets.glob("*.json")) if len(list(servers.targets.glob("*.json"))) == 2 else None,
            120,
            "two target files",
        )
        assert [f.name.removeprefix(f"{RUN}-").split("-")[1] for f in files] == ["rank0.json", "rank1.json"]
        for file in files:
            (entry,) = json.loads(file.read_text())
            assert entry["labels"]["run_folder"] == str(tmp_path / "run")
            url = f"http://{entry['targets'][0]}/metrics"
            body = wait_for(lambda u=url: scrape_once_trained(u), 60, f"a window's metrics at {url}")
            lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
            assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
        wait_for(
            lambda: len(servers.query(f'up{{job="meg",run="{RUN}"}} == 1')) == 2, 30, "Prometheus to scrape both ranks"
        )
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert not list(servers.targets.glob("*.json")), "a clean exit removes the target files"

    # 2. The run resumed to twice its steps (as after a requeue), then finishes with its final evaluation.
    resumed = run_trainer(training_args(tmp_path, servers, 2 * STEPS), launcher=launcher, env=env)
    assert f"resumed from step {STEPS}" in resumed.stdout
    time.sleep(3)  # the last scrapes
    end = time.time()

    # Every dashboard query returns data over the run (the GPU panel needs CUDA).
    gpu_only = {q for q in _dashboard_queries() if "meg_gpu_" in q}
    empty = []
    for query in _dashboard_queries():
        if query in gpu_only and not torch.cuda.is_available():
            continue
        expr = query.replace("$run", RUN).replace("$__rate_interval", RATE_INTERVAL)
        if not servers.query(expr, started, end):
            empty.append(expr)
    for expr in alert_inner_queries():
        if not servers.query(expr, started, end):
            empty.append(expr)
    assert not empty, f"queries without data: {empty}"

    # The step counter restarts with the resumed process (Prometheus sees a reset) instead of
    # jumping to the checkpoint's step: no rate spike. Each process trained STEPS steps.
    series = servers.query(f'meg_steps_total{{run="{RUN}"}}', started, end)
    assert len(series) == 2  # one per process (each served on its own port)
    for s in series:
        assert max(float(v) for _, v in s["values"]) <= STEPS
    rates = [
        float(v)
        for s in servers.query(f'sum by (run) (rate(meg_steps_total{{run="{RUN}"}}[{RATE_INTERVAL}]))', started, end)
        for _, v in s["values"]
    ]
    print(f"steps/s panel: median {statistics.median(rates):.1f}, max {max(rates):.1f} over {len(rates)} points")

    # After the processes exited, the final numbers are still there: pushed to the Pushgateway.
    final = {r["metric"]["metric"]: float(r["value"][1]) for r in servers.query(f'meg_eval_result{{run="{RUN}"}}')}
    assert "high_quality_share" in final, final
    # Live and pushed series carry the same run_folder (target file, grouping key): one line per run.
    (step,) = servers.query(f'max by (run, run_folder) (meg_step{{run="{RUN}"}})')
    assert step["metric"]["run_folder"] == str(tmp_path / "run") and float(step["value"][1]) == 2 * STEPS
    assert [float(r["value"][1]) for r in servers.query(f'max by (run) (meg_eval_step{{run="{RUN}"}})')] == [2 * STEPS]

    # 3. A killed run leaves its target files: Prometheus reports both ranks down (MEGTargetDown's input).
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", *training_args(tmp_path, servers, 100 * STEPS)]
    third = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: servers.query_count(f'up{{job="meg",run="{RUN}"}} == 1', 2), 120, "the third run's scrapes")
    finally:
        # The launcher and its workers (torch's elastic agent starts each in a session of its own),
        # as the OOM killer or a node failure would.
        subprocess.run(["pkill", "-KILL", "-f", f"output_dir={tmp_path / 'run'}"])
        third.wait()
    assert len(list(servers.targets.glob("*.json"))) == 2
    down = wait_for(lambda: servers.query_count(f'up{{job="meg",run="{RUN}"}} == 0', 2), 30, "both ranks down")
    assert sorted(r["metric"]["rank"] for r in down) == ["0", "1"]
