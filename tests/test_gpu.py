"""The GPU path: every combination a user runs, a few steps each, and what only a GPU can show.

Skipped without CUDA, except under bench/gpu_check.sh --dry-run (MEG_GPU_DRY_RUN=1), which runs the
same tests on the CPU at tiny sizes so that the GPU check cannot rot. On a CPU the capture tests
compare eager with eager (capture needs CUDA) and the sync check is off: they only prove the code runs.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from models import build_networks
from tests.conftest import REPO_ROOT, TEST_DEVICE, run_trainer, subprocess_env, tiny_overrides
from trainer.config import load_config
from trainer.runtime import DDPRuntime
from trainer.steps import build_steps, resolve_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]
ON_CUDA = TEST_DEVICE.type == "cuda"

COMBINATIONS = {
    "ddp_fp32": [],
    "ddp_bf16": ["train.mixed_precision=bf16"],
    "ddp_fp16": ["train.mixed_precision=fp16"],
    "zero1_bf16": ["train.engine=deepspeed", "deepspeed.zero_stage=1", "train.mixed_precision=bf16"],
    "zero2_bf16": ["train.engine=deepspeed", "deepspeed.zero_stage=2", "train.mixed_precision=bf16"],
    "mala_negatives": ["train.negatives=mala", "train.negatives_mala.steps=3"],
    "lazy_penalty": ["train.penalty_every=4"],
}


def _run(tmp_path, steps: int, extra: list[str]) -> subprocess.CompletedProcess:
    # 3 warm-up calls, then capture: 6 generator steps replay each captured step at least twice.
    # model.kernels: auto on CUDA (fused); fused on a CPU too (the dry run), where Triton's interpreter runs them.
    overrides = [o for o in tiny_overrides(tmp_path, steps) if not o.startswith(("log.every", "checkpoint.every"))]
    kernels = "model.kernels=" + ("auto" if ON_CUDA else "fused")
    return run_trainer([*overrides, "log.every=3", "checkpoint.every=3", kernels, *extra], timeout=600)


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "energy_loss" in r]


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_trainer_runs_every_combination_on_the_device(tmp_path, combination):
    extra = COMBINATIONS[combination]
    result = _run(tmp_path, 6, extra)
    assert f"on {TEST_DEVICE.type}" in result.stdout
    deepspeed = "train.engine=deepspeed" in extra
    assert "kernels bias_act+gradfix_conv+penalty" in result.stdout
    if ON_CUDA:
        expected = "capture off: DeepSpeed" if deepspeed else "capture on (CUDA graphs)"
        assert expected in result.stdout, result.stdout
    assert "capture off for" not in result.stderr, result.stderr  # a capture that failed and fell back
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        for key in ("energy_loss", "generator_loss", "energy_gap", "mi_estimate", "sample_spread"):
            assert torch.isfinite(torch.tensor(r[key])), (key, r)
        assert r["skipped_steps"] == 0  # the fp16 scale starts at 2**15: no overflow on the toy problem
    penalties = [r.get("penalty") for r in records]
    assert all(p is not None and p >= 0 for p in penalties)


def test_resume_on_the_device_continues_where_a_straight_run_goes(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, 9, [])
    _run(split, 6, [])
    resumed = _run(split, 9, [])
    assert "resumed from step 6" in resumed.stdout
    weights = "checkpoints/step_00000009/weights.safetensors"
    a, b = load_file(straight / "run" / weights), load_file(split / "run" / weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sample_and_evaluate_tools_on_a_device_run(tmp_path):
    _run(tmp_path, 6, ["train.mixed_precision=bf16"])
    run = tmp_path / "run"
    tools = [
        ["trainer.sample", "--run", str(run), "--num", "256", "--mala-steps", "2", "--npy", str(tmp_path / "s.npy")],
        ["trainer.evaluate", "--run", str(run), "eval.num_samples=500", "eval.mala.steps=2", "eval.plots=false"],
    ]
    for tool in tools:
        result = subprocess.run(
            [sys.executable, "-m", *tool], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "s.npy").stat().st_size > 256 * 2 * 4
    evaluation = json.loads((run / "eval" / "eval_step_00000006.json").read_text())
    assert evaluation["num_modes"] == 25 and 0 <= evaluation["mala_acceptance_rate"] <= 1


# -- in process: capture against eager, and no host sync -----------------------------------------


CONV = ["model.arch=conv", "model.conv_width=4", "model.z_dim=8", "data.batch_size=8", "model.init_std=0.02"]


def _steps(capture: str, precision: str, *extra: str):
    cfg = load_config(
        "toy_25gaussians",
        [*CONV, "train.energy_steps=2", f"train.capture={capture}", f"train.mixed_precision={precision}", *extra],
    )
    runtime = DDPRuntime(precision)
    torch.manual_seed(0)
    nets = build_networks(cfg.model, (3, 28, 28), resolve_kernels(cfg.model.kernels, runtime.device))
    return build_steps(cfg, runtime, nets)


def _train(steps, iterations: int, first: int = 0) -> list[dict]:
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(5)).to(steps.device)
    out = []
    for step in range(first, first + iterations):
        torch.manual_seed(100 + step)  # the same z and permutations for the captured and the eager run
        out.append({k: v.float().item() for k, v in steps.iteration(step, lambda: x).items()})
    return out


def _assert_same_parameters(a, b, rtol):
    for m, n in zip(a.modules(), b.modules(), strict=True):
        for p, q in zip(m.parameters(), n.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * max(q.abs().max().item(), 1e-3))


@pytest.mark.parametrize("precision, rtol", [("no", 1e-5), ("bf16", 2e-2), ("fp16", 2e-2)])
@pytest.mark.parametrize("penalty_every", [1, 2])
def test_captured_steps_match_eager_steps(precision, rtol, penalty_every):
    captured = _steps("auto", precision, f"train.penalty_every={penalty_every}")
    eager = _steps("off", precision, f"train.penalty_every={penalty_every}")
    assert captured.capture == ON_CUDA
    got, expected = _train(captured, 8), _train(eager, 8)
    for a, b in zip(got, expected):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=rtol), (key, a, b)
    _assert_same_parameters(captured, eager, rtol)


def test_capture_is_redone_after_a_checkpoint_load():
    # Loading an older checkpoint (a resume, a divergence rollback) puts new state tensors into the
    # optimizers. A graph still pointing at the old ones would go on with the newer moments.
    captured, eager = _steps("auto", "no"), _steps("off", "no")
    for steps in (captured, eager):
        _train(steps, 2)
        networks = [copy.deepcopy(m.state_dict()) for m in steps.modules()]
        optimizers = [copy.deepcopy(u.optimizer.state_dict()) for u in (steps.energy_update, steps.generator_update)]
        _train(steps, 4, first=2)  # captured by now
        for module, state in zip(steps.modules(), networks):
            module.load_state_dict(state)
        for update, state in zip((steps.energy_update, steps.generator_update), optimizers):
            update.optimizer.load_state_dict(copy.deepcopy(state))
        steps.after_checkpoint_load()
        _train(steps, 5, first=2)
    _assert_same_parameters(captured, eager, 1e-5)


@pytest.mark.parametrize(
    "precision, extra", [("no", []), ("fp16", []), ("no", ["train.negatives=mala", "train.negatives_mala.steps=2"])]
)
def test_an_eager_iteration_never_syncs_with_the_host(precision, extra):
    steps = _steps("off", precision, *extra)
    x = torch.randn(8, 3, 28, 28, device=steps.device)
    steps.iteration(0, lambda: x)  # lazy initialisation (optimizer state, loss scale) may sync once
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            steps.iteration(step, lambda: x)
    finally:
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("default")


def test_prometheus_exports_the_devices_memory_per_rank(tmp_path):
    from prometheus_client import generate_latest

    from trainer.metrics import LogConfig
    from trainer.prometheus import GPU_MEMORY, PrometheusExporter

    held = torch.ones(1 << 20, device=TEST_DEVICE)  # 4 MiB the allocator must report
    exp = PrometheusExporter(LogConfig(prometheus_port=0), "gpu", 0, 0, TEST_DEVICE, 10, 1, {})
    try:
        body = generate_latest(exp.registry).decode()
    finally:
        exp.close()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line[:1] != "#"}
    if not ON_CUDA:  # the dry run: no CUDA allocator to read, and no series claiming one
        assert not any(k.startswith("meg_gpu_memory") for k in series)
        return
    for name in GPU_MEMORY:
        assert series[f'meg_gpu_memory_{name}_bytes{{rank="0",run="gpu"}}'] >= held.numel() * 4, name
