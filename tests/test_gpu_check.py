"""bench/gpu_check.sh --dry-run: the GPU check's every phase on the CPU at tiny sizes, so it cannot rot."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_phase(tmp_path):
    env = subprocess_env()
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=1500,
    )  # fmt: skip
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stderr[-3000:]
    assert "every phase passed" in summary and "FAILED" not in summary
    for phase in ("gpu tests", "bench_penalty fp32", "bench_penalty bf16", "bench_penalty compile vs capture",
                  "bench_steps", "stackedmnist evaluation"):  # fmt: skip
        assert f"- {phase}: ok" in summary, phase
    # Every table has a row per network, and the StackedMNIST run reports its speed and modes.
    fp32 = (tmp_path / "bench_penalty_fp32.md").read_text()
    for network in ("toy", "kdd", "stackedmnist", "cifar"):
        assert f"| {network} | + penalty kernel |" in fp32
    assert "samples/s" in summary and "modes_hit" in summary
