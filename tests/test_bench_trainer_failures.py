"""bench/bench_data_wait.py and bench/bench_entropy.py run the trainer as a child: its failure reaches the user
as one error line with the trainer's own message, and the 28x28 case is a job the trainer accepts."""

import importlib.util
import subprocess

import numpy as np
import pytest

from data_pipeline.cli import run_tool
from data_pipeline.shards import write_array_shards
from tests.conftest import REPO_ROOT, subprocess_env
from trainer.config import load_config
from trainer.evaluation import check_samples


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_data_wait = _load("bench_data_wait")
bench_entropy = _load("bench_entropy")


@pytest.mark.parametrize(
    "run",
    [
        # train.steps=0 (and log.every=0): a job the trainer refuses at once.
        lambda tmp: bench_data_wait.run_case("toy", [], 0, 0, "thread", str(tmp)),
        lambda tmp: bench_entropy.train("jsd", 0, 0, str(tmp)),
    ],
    ids=["bench_data_wait", "bench_entropy"],
)
def test_a_failed_trainer_run_is_one_error_line_with_the_trainers_message(tmp_path, capsys, run):
    assert run_tool(lambda: run(tmp_path), debug=False) == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("error: the trainer on ") and " failed (exit 2): " in first and "train.steps" in first
    assert "Traceback" not in err and "CalledProcessError" not in err


def test_the_conv28_case_is_a_job_the_trainer_accepts(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
    write_array_shards(str(tmp_path / "digits"), "digits", "train", digits, np.zeros(256, np.int64), 2)
    overrides = bench_data_wait.cases(str(tmp_path))["conv28"]
    cmd = bench_data_wait.trainer_command(overrides, 9, 0, "thread", str(tmp_path / "run"))
    # The check the trainer makes once it has read the shards' sample shape (--check does not read data).
    check_samples(load_config("toy_25gaussians", cmd[4:]), [1, 28, 28])
    result = subprocess.run([*cmd, "--check"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
