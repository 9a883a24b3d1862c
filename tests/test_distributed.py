"""Several CPU processes really form one DDP group, stay in sync, and match one process."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, accelerate_launcher, run_trainer


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_ddp_gradients_match_single_process_and_ranks_stay_in_sync(tmp_path, nproc):
    out = tmp_path / "result.json"
    launcher, env = accelerate_launcher(nproc)
    if nproc == 1:
        launcher = [sys.executable]
    done = subprocess.run(
        [*launcher, "tests/scripts/ddp_check.py", str(out)],
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == nproc
    assert result["grad_rel_error"] < 1e-5, result
    assert result["in_sync"] is True


@pytest.mark.slow
def test_two_rank_training_through_accelerate_launch(tmp_path, tiny):
    launcher, env = accelerate_launcher(2)
    result = run_trainer(tiny, launcher=[*launcher], env=env)
    assert "2 process(es)" in result.stdout
    assert '"ranks_in_sync": 1.0' in result.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len([json.loads(line) for line in lines if "energy_loss" in line]) == 4  # steps 5..20


@pytest.mark.slow
def test_unconnected_processes_are_refused(tiny):
    # Without ACCELERATE_USE_CPU on a machine with no GPU, accelerate starts processes that do not
    # form a group: each would train alone. The trainer must refuse loudly.
    if os.environ.get("CUDA_VISIBLE_DEVICES") or _has_cuda():
        pytest.skip("this trap only exists on machines without a GPU")
    launcher, env = accelerate_launcher(2, use_cpu=False)
    result = run_trainer(tiny, launcher=launcher, env=env, check=False)
    assert result.returncode != 0
    assert "did not form one group" in result.stderr


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
def test_accelerate_mixed_precision_flag_is_refused_not_ignored(tmp_path, tiny):
    launcher, env = accelerate_launcher(1)
    launcher = [*launcher[:2], "accelerate.commands.launch", "--mixed_precision", "bf16", "--num_processes", "1"]
    result = run_trainer(tiny, launcher=launcher, env=env, check=False)
    assert result.returncode != 0
    assert "pass train.mixed_precision=bf16 to trainer/main.py" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
