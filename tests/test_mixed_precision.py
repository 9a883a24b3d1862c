"""Mixed precision: the penalty under bf16/fp16 matches fp32, the fp16 loss-scaling recipe is what
saves it from underflow, and an overflowing fp16 step is skipped by the trainer's real step code.

fp16 runs on CPU here because the runtime drives torch.autocast and torch.amp.GradScaler('cpu')
itself (accelerate would silently fall back to fp32 on CPU). DeepSpeed's own fp16 needs a GPU.
"""

import json

import pytest
import torch

from models.factory import build_networks
from models.objectives import gradient_penalty
from tests.conftest import run_trainer, tiny_overrides
from trainer.config import GuardConfig, load_config
from trainer.guard import DivergenceGuard
from trainer.metrics import MetricWindow
from trainer.runtime import FP16_INIT_SCALE, DDPRuntime
from trainer.steps import build_steps

# Measured on the tiny E (32x32 MLP, 256 points): bf16 4.7e-3, fp16 1.8e-4 relative to fp32.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _tiny_cfg(*extra):
    return load_config(
        "toy_25gaussians",
        [
            "model.hidden=[32,32]",
            "model.generator_hidden=[32,32]",
            "data.batch_size=64",
            "train.penalty_weight=1.0",
            *extra,
        ],
    )


def _energy():
    torch.manual_seed(0)
    return build_networks(_tiny_cfg().model, (2,)).energy, torch.randn(256, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_penalty_matches_fp32(dtype):
    energy, x = _energy()
    reference = gradient_penalty(energy, x)[1]
    scale = FP16_INIT_SCALE if dtype == torch.float16 else 1.0
    with torch.autocast("cpu", dtype=dtype):
        penalty = gradient_penalty(energy, x, scale)[1]
    assert penalty.dtype == torch.float32
    assert abs(penalty - reference) / reference < TOLERANCE[dtype]


def test_fp16_penalty_needs_the_scale_and_the_unscale():
    # An energy with small gradients (1e-7 x E): in fp16 the inner gradient underflows to zero unless
    # the output is scaled before autograd.grad; dividing it back gives the fp32 value.
    energy, x = _energy()
    small = lambda v: energy(v) * 1e-7  # noqa: E731
    reference = gradient_penalty(small, x)[1]
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = gradient_penalty(small, x)[1]
        scaled = gradient_penalty(small, x, FP16_INIT_SCALE)[1]
    assert unscaled == 0  # underflow: the penalty silently vanishes
    assert abs(scaled - reference) / reference < TOLERANCE[torch.float16]


def _steps_in(precision):
    cfg = _tiny_cfg(f"train.mixed_precision={precision}")
    torch.manual_seed(0)
    return build_steps(cfg, DDPRuntime(precision), build_networks(cfg.model, (2,)))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("which", ["energy", "generator"])
def test_forced_fp16_overflow_is_skipped_then_training_goes_on(which):
    steps = _steps_in("fp16")
    update = steps.energy_update if which == "energy" else steps.generator_update
    module = steps.energy if which == "energy" else steps.generator
    x = torch.randn(64, 2)

    def step():
        if which == "energy":
            return steps.energy_step(x, steps.sample_z())
        return steps.generator_step(steps.sample_z())

    assert update.scaler.is_enabled() and update.penalty_scale() == FP16_INIT_SCALE
    assert step()["skipped_steps"].item() == 0.0  # an ordinary fp16 step is applied

    def adam_steps():
        return [float(s["step"]) for s in update.optimizer.state.values()]

    update.scaler.update(new_scale=2.0**100)  # far past fp16's range: the scaled gradients are inf
    before, moments = _params(module), adam_steps()
    metrics = step()
    assert metrics["skipped_steps"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True)), (
        "a skipped step changed weights"
    )
    assert adam_steps() == moments, "Adam's state advanced on a skipped step"
    assert update.penalty_scale() == 2.0**99  # the scaler backed off

    update.scaler.update(new_scale=FP16_INIT_SCALE)
    metrics = step()
    assert metrics["skipped_steps"].item() == 0.0
    assert torch.isfinite(torch.stack([v.float() for v in metrics.values()])).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))
    assert adam_steps() == [m + 1 for m in moments]


@pytest.mark.parametrize("saved, resumed", [("no", "fp16"), ("bf16", "fp16"), ("fp16", "no"), ("fp16", "fp16")])
def test_a_checkpoint_resumes_under_another_precision(tmp_path, caplog, saved, resumed):
    # A run without fp16 saves an empty GradScaler state; a resume in fp16 used to raise on it
    # ("The source state dict is empty") after the networks were already loaded.
    writer, reader = _steps_in(saved), _steps_in(resumed)
    x = torch.randn(64, 2)
    writer.iteration(0, lambda: x)
    if saved == "fp16":
        writer.energy_update.scaler.update(new_scale=2.0**10)
    writer.runtime.save_engine_state(str(tmp_path))
    reader.runtime.restore(str(tmp_path), writer.runtime.fp32_state_dicts())
    reader.after_checkpoint_load()
    assert all(torch.equal(a, b) for a, b in zip(_params(writer.energy), _params(reader.energy), strict=True))
    moments = [s["exp_avg"] for s in reader.energy_update.optimizer.state.values()]
    assert moments and all(torch.equal(a, b) for a, b in zip(
        moments, [s["exp_avg"] for s in writer.energy_update.optimizer.state.values()], strict=True))  # fmt: skip
    if resumed == "fp16":
        scale = 2.0**10 if saved == "fp16" else FP16_INIT_SCALE
        assert reader.energy_update.penalty_scale() == scale
        assert ("written without fp16" in caplog.text) == (saved != "fp16")
    metrics = reader.iteration(1, lambda: x)
    assert torch.isfinite(torch.stack([v.float() for v in metrics.values()])).all()


def test_metric_window_leaves_skipped_steps_out_of_the_divergence_guard():
    window = MetricWindow(DDPRuntime("fp16"), DivergenceGuard(GuardConfig()), samples_per_step=64)
    one = torch.tensor(1.0)
    ok = {"energy_gap": one, "penalty": torch.tensor(0.5), "penalty_steps": one, "skipped_steps": torch.tensor(0.0)}
    overflowed = {
        "energy_gap": torch.tensor(float("inf")),
        "penalty": torch.tensor(float("nan")),
        "penalty_steps": one,
        "skipped_steps": one,
    }
    for m in (ok, overflowed, ok):
        window.record(m)
    out, stop = window.reduce(step=3, elapsed=1.0, stop=False)
    assert out["skipped_steps"] == 1 and out["energy_gap"] == 1.0 and out["penalty"] == 0.5 and not stop


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_toy_run_trains(tmp_path, precision):
    run_trainer([*tiny_overrides(tmp_path, steps=10), f"train.mixed_precision={precision}"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "energy_loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    assert all(r["skipped_steps"] == 0 for r in train)  # 2**15 start: no overflow on the toy problem
