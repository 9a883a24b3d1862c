"""Observability: the live Prometheus endpoint of a real run, and the progress line."""

import io
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO_ROOT, subprocess_env, tiny_overrides
from trainer.metrics import ProgressSink

EXPECTED = [
    "meg_energy_loss",
    "meg_generator_loss",
    "meg_energy_gap",
    "meg_penalty",
    "meg_mi_estimate",
    "meg_sample_spread",
    "meg_samples_per_s",
    "meg_step_time_s",
    "meg_steps_total",
]


@pytest.mark.slow
def test_running_job_serves_prometheus_metrics(tmp_path):
    args = [o for o in tiny_overrides(tmp_path, steps=2000) if not o.startswith("log.prometheus")]
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "toy_25gaussians",
        *args,
        "log.prometheus_port=0",
        "name=promtest",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("prometheus metrics: "):
                url = line.split(": ", 1)[1].strip()
                break
        assert url and url.startswith("http://127.0.0.1:")
        deadline, body = time.time() + 120, ""
        while time.time() < deadline:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            if all(name in body for name in EXPECTED):
                break
            time.sleep(0.5)
        for name in EXPECTED:
            assert name in body, f"{name} missing from:\n{body[:2000]}"
        assert 'meg_energy_loss{rank="0",run="promtest"}' in body
        steps = float(next(line.split()[-1] for line in body.splitlines() if line.startswith("meg_steps_total{")))
        assert steps >= 5
    finally:
        proc.kill()
        proc.wait()


def test_progress_line_shows_step_losses_throughput_and_eta():
    out = io.StringIO()
    sink = ProgressSink(total_steps=100, stream=out)
    sink.log(50, {"energy_loss": -0.5, "generator_loss": 1.25, "samples_per_s": 1234.0, "step_time_s": 2.0})
    line = out.getvalue()
    assert "step 50/100" in line and "energy_loss=-0.5" in line and "1234 samples/s" in line
    assert "ETA 0:01:40" in line
