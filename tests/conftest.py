"""Shared helpers: a tiny toy configuration and a way to run the real trainer as a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    # Triton runs on a CPU only in its interpreter (read when a kernel module is imported): the
    # kernel tests use it at tiny shapes.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# bench/gpu_check.sh --dry-run sets this: the `gpu` tests then run on the CPU at tiny sizes, so that
# the GPU check cannot rot on machines without a GPU.
GPU_DRY_RUN = os.environ.get("MEG_GPU_DRY_RUN") == "1"
TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=[TEST_DEVICE.type])
def device(request) -> torch.device:
    """The device a test runs on, in its id: CUDA where there is one, else the CPU (bench/gpu_check.sh
    --dry-run runs the GPU tests there: capture off, Triton's interpreter for the fused kernels)."""
    return torch.device(request.param)


@pytest.fixture
def no_tf32():
    """fp32 comparisons on a GPU: TF32 matmuls and convolutions (cuDNN's default) round to 10 bits."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default algorithms may add a convolution's gradient in any order: gradcheck's
    reentrancy check (two backwards, bit-equal) and step-by-step comparisons need a fixed order."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.fixture
def compiled_triton_arguments(monkeypatch):
    """Triton's interpreter types a Python float kernel argument as it passes it: a double. Compiled
    Triton types it fp32, so an fp64 kernel would compute with a rounded value there. Under the
    interpreter, round float arguments to fp32 the way compiled Triton does (a no-op on CUDA)."""
    if TEST_DEVICE.type == "cuda" or importlib.util.find_spec("triton") is None:
        yield  # compiled for real, or no Triton (its tests skip)
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    plain = interpreter._implicit_cvt

    def as_compiled(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return plain(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", as_compiled)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or GPU_DRY_RUN:
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device; bench/gpu_check.sh --dry-run (tests/test_gpu_check.py) runs it on the CPU"
    )
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def set_up_venv(tmp_path: Path) -> str:
    """A MEG_VENV for launch.sh that is the environment running the suite, marked set up: given that
    environment itself, launch.sh's set-up pip-installed the pinned torch into it wherever it was not
    made by ./launch.sh (a developer's own environment, or one of the GPU machine's torch)."""
    venv = tmp_path / "set-up-venv"
    (venv / "bin").mkdir(parents=True)
    for tool in Path(sys.prefix, "bin").iterdir():
        if tool.name not in ("python", "python3") and tool.is_file() and os.access(tool, os.X_OK):
            (venv / "bin" / tool.name).symlink_to(tool)
    for name in ("python", "python3"):  # a venv's python finds its packages from its own path: run it by that
        (venv / "bin" / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (venv / "bin" / name).chmod(0o755)
    stamp = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".meg-setup").write_text(stamp + "\n")
    return str(venv)


def tiny_overrides(tmp_path: Path, steps: int = 20) -> list[str]:
    """A toy run small enough for the default suite: 32-unit networks, 4k samples, no plots."""
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.url={tmp_path / 'data'}",
        "data.toy_num_samples=4096",
        "data.toy_num_shards=4",
        "data.batch_size=64",
        "data.num_workers=1",
        "model.hidden=[32,32]",
        "model.generator_hidden=[32,32]",
        f"train.steps={steps}",
        "log.every=5",
        "log.prometheus_port=-1",
        "checkpoint.every=10",
        "eval.every=0",
        "eval.num_samples=500",
        "eval.plots=false",
        # A constant learning rate: the preset's decay depends on train.steps, so a run split in
        # two with different train.steps would follow another schedule than one straight run.
        "train.lr_final_factor=1.0",
    ]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    # The code under test, not whichever checkout an editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def accelerate_launcher(nproc: int, use_cpu: bool = True) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` for ``nproc`` local processes, and its environment. Without a GPU the
    processes form one group only with ACCELERATE_USE_CPU=1 (accelerate's CPU mode)."""
    env = subprocess_env()
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    launcher = [
        sys.executable,
        "-m",
        "trainer.launch",  # accelerate launch, the rendezvous store on 127.0.0.1
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
    ]
    return launcher, env


def run_trainer(
    args: list[str],
    launcher: list[str] | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    check: bool = True,
    preset: str = "toy_25gaussians",
) -> subprocess.CompletedProcess:
    """Runs trainer/main.py (or a launcher in front of it) from the repo root; returns the result."""
    cmd = (launcher or [sys.executable]) + ["trainer/main.py", "--config", preset, *args]
    result = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    return tiny_overrides(tmp_path)
