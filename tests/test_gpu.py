"""The GPU path: every combination a user runs, a few steps each, and what only a GPU can show.

Each test takes the ``device`` fixture: CUDA where there is one; else the CPU, which only
bench/gpu_check.sh --dry-run selects (MEG_GPU_DRY_RUN=1; tests/test_gpu_check.py runs it in the
suite), so that these tests cannot rot on machines without a GPU. On a CPU the fused kernels run in
Triton's interpreter, capture is off (the capture tests then compare eager with eager) and the sync
check has no CUDA to watch: there they prove that the code runs and gives the same numbers.
"""

import copy
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.shards import read_manifest, write_array_shards
from data_pipeline.stream import ShardStream, StreamPosition
from models.factory import build_networks
from models.ops import TORCH_KERNELS, use_kernels
from tests.conftest import REPO_ROOT, TEST_DEVICE, run_trainer, subprocess_env, tiny_overrides
from trainer.capture import WARMUP_CALLS, GraphedStep
from trainer.config import load_config, vera_settings
from trainer.meg_trainer import host_pinning
from trainer.runtime import DDPRuntime
from trainer.steps import build_steps, resolve_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]

FUSED_OPS = "kernels bias_act+gradfix_conv+penalty"
COMBINATIONS = {
    "ddp_fp32": [],
    "ddp_bf16": ["train.mixed_precision=bf16"],
    "ddp_fp16": ["train.mixed_precision=fp16"],
    "zero1_bf16": ["train.engine=deepspeed", "deepspeed.zero_stage=1", "train.mixed_precision=bf16"],
    "zero2_bf16": ["train.engine=deepspeed", "deepspeed.zero_stage=2", "train.mixed_precision=bf16"],
    "mala_negatives": ["train.negatives=mala", "train.negatives_mala.steps=3"],
    "lazy_penalty": ["train.penalty_every=4"],
}
if TEST_DEVICE.type == "cuda":
    # auto picks eager kernels where a step is not captured: this is the fused ops under DeepSpeed, in
    # fp16 (DeepSpeed's CPU accelerator has no fp16, so the dry run cannot have this combination).
    COMBINATIONS["zero2_fp16_fused"] = [
        "train.engine=deepspeed", "deepspeed.zero_stage=2", "train.mixed_precision=fp16", "model.kernels=fused"
    ]  # fmt: skip


def _run(tmp_path, device: torch.device, steps: int, extra: list[str], env=None) -> subprocess.CompletedProcess:
    # 3 warm-up calls, then capture: 6 generator steps replay each captured step at least twice.
    # model.kernels: auto on CUDA; fused on a CPU (the dry run), where Triton's interpreter runs them.
    overrides = [o for o in tiny_overrides(tmp_path, steps) if not o.startswith(("log.every", "checkpoint.every"))]
    kernels = "model.kernels=" + ("auto" if device.type == "cuda" else "fused")
    # The density's quadrature (800k energies) through interpreted kernels would take minutes a run;
    # it is tested on its own (tests/test_density.py). So would the preset's 100 MALA steps of the
    # final evaluation (13 s of a 16 s run): 2 take the same code path.
    interpreted = [] if device.type == "cuda" else ["eval.toy.density=false", "eval.mala.steps=2"]
    return run_trainer(
        [*overrides, "log.every=3", "checkpoint.every=3", kernels, *interpreted, *extra], timeout=600, env=env
    )


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "energy_loss" in r]


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_trainer_runs_every_combination_on_the_device(tmp_path, device, combination):
    extra = COMBINATIONS[combination]
    result = _run(tmp_path, device, 6, extra)
    assert f"on {device.type}" in result.stdout
    deepspeed = "train.engine=deepspeed" in extra
    if device.type == "cuda":
        assert ("capture off: DeepSpeed" if deepspeed else "capture on (CUDA graphs)") in result.stdout, result.stdout
        fused = not deepspeed or "model.kernels=fused" in extra
        assert (FUSED_OPS + " (triton)" if fused else "kernels eager") in result.stdout, result.stdout
    else:
        assert FUSED_OPS + " (triton)" in result.stdout, result.stdout  # the interpreter's
    assert "capture off for" not in result.stderr, result.stderr  # a capture that failed and fell back
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        for key in ("energy_loss", "generator_loss", "energy_gap", "mi_estimate", "sample_spread"):
            assert np.isfinite(r[key]), (key, r)
        assert r["skipped_steps"] == 0  # the fp16 scale starts at 2**15: no overflow on the toy problem
    assert all(r.get("penalty") is not None and r["penalty"] >= 0 for r in records)


def test_resume_on_the_device_continues_where_a_straight_run_goes(tmp_path, device):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, device, 9, [])
    _run(split, device, 6, [])
    resumed = _run(split, device, 9, [])
    assert "resumed from step 6" in resumed.stdout
    weights = "checkpoints/step_00000009/weights.safetensors"
    a, b = load_file(straight / "run" / weights), load_file(split / "run" / weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_an_evaluation_mid_run_leaves_training_bit_identical(tmp_path, device):
    # Evaluation (sampling, latent MALA) draws random numbers on the CPU and on the device; it runs on
    # forked generators, so a run that evaluates every 2 steps trains exactly as one that does not.
    env = {**subprocess_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS on a GPU
    evaluating = ["eval.every=2", "eval.mala.steps=2"]
    _run(tmp_path / "evaluating", device, 6, evaluating, env=env)
    _run(tmp_path / "plain", device, 6, ["eval.mala.steps=2"], env=env)
    assert len(list((tmp_path / "evaluating" / "run" / "eval").glob("step_*.json"))) == 3
    weights = "run/checkpoints/step_00000006/weights.safetensors"
    a, b = load_file(tmp_path / "evaluating" / weights), load_file(tmp_path / "plain" / weights)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sample_and_evaluate_tools_on_a_device_run(tmp_path, device):
    # 2 MALA steps on a GPU too: the run's fused kernels and the tools' eager ones round apart, and over the
    # preset's 100 steps x 500 chains one accept/reject decision within that rounding moves a chain.
    _run(tmp_path, device, 6, ["train.mixed_precision=bf16", "eval.mala.steps=2"])
    run = tmp_path / "run"
    tools = [
        ["trainer.sample", "--run", str(run), "--num", "256", "--mala-steps", "2", "--npy", str(tmp_path / "s.npy")],
        ["trainer.evaluate", "--run", str(run), "eval.plots=false"],
    ]
    for tool in tools:
        result = subprocess.run(
            [sys.executable, "-m", *tool], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "s.npy").stat().st_size > 256 * 2 * 4
    # The tool scores the checkpoint with the run's evaluation seed: the numbers of the evaluation the
    # run made at that step (on a GPU the run's fused kernels and the tool's eager ones round apart).
    tool = json.loads((run / "eval" / "eval_step_00000006.json").read_text())
    during = json.loads((run / "eval" / "step_00000006.json").read_text())
    assert tool["num_modes"] == 25 and 0 <= tool["mala_acceptance_rate"] <= 1
    assert tool.keys() == during.keys()
    for key, value in during.items():  # NaN alike in both: no sample near a mode yet (mode_kl_reverse)
        expected = pytest.approx(value, rel=1e-3, abs=1e-3, nan_ok=True) if isinstance(value, float) else value
        assert tool[key] == expected, key


def test_batches_are_pinned_for_the_device(tmp_path, device):
    x = np.random.default_rng(0).integers(0, 256, size=(128, 1, 8, 8), dtype=np.uint8)
    write_array_shards(str(tmp_path), "img", "train", x, np.arange(128) % 10, 4)
    pin = host_pinning(device)
    stream = ShardStream(read_manifest(str(tmp_path)), 0, 1, 16, 2, shuffle_buffer=32, pin=pin)
    batches = list(stream.epoch_batches(StreamPosition()))
    assert len(batches) == 8
    if device.type == "cuda":
        assert all(b["x"].is_pinned() for b in batches)
    else:
        assert pin is None  # nothing to copy asynchronously to


# -- in process: capture against eager, and no host sync -----------------------------------------


@pytest.fixture
def fused_kernels(device, deterministic_cudnn):
    """The fused ops' kernels for the in-process tests: Triton on CUDA; on a CPU their PyTorch
    reference (the same autograd wiring; Triton's interpreter, 150x slower, is tests/test_fused_ops.py's).
    cuDNN's algorithms are deterministic (bench/gpu_check.sh sets CUBLAS_WORKSPACE_CONFIG for cuBLAS):
    an order-dependent sum in a convolution's weight gradient would differ between the captured and
    the eager step by more than their rounding."""
    if device.type == "cuda":
        yield
        return
    with use_kernels(TORCH_KERNELS):
        yield


CONV = ["model.arch=conv", "model.conv_width=4", "model.z_dim=8", "data.batch_size=8", "model.init_std=0.02"]


def _steps(capture: str, precision: str, *extra: str):
    cfg = load_config(
        "toy_25gaussians",
        [*CONV, "train.energy_steps=2", f"train.capture={capture}", f"train.mixed_precision={precision}",
         "model.kernels=fused", *extra],
    )  # fmt: skip
    runtime = DDPRuntime(precision)
    torch.manual_seed(0)
    nets = build_networks(cfg.model, (3, 28, 28), resolve_kernels(cfg, runtime), vera_settings(cfg))
    return build_steps(cfg, runtime, nets)


def _batches(device: torch.device, iterations: int, first: int = 0) -> list[list[torch.Tensor]]:
    """Each iteration's two real batches (train.energy_steps=2), new every iteration and the same for
    both runs: a replay that kept reading an old batch would train on it."""
    g = torch.Generator().manual_seed(5 + first)
    return [[torch.randn(8, 3, 28, 28, generator=g).to(device) for _ in range(2)] for _ in range(iterations)]


def _iterate(steps, step: int, batches: list[torch.Tensor]) -> dict[str, float]:
    torch.manual_seed(100 + step)  # the same z, permutations and device noise for both runs
    return {k: v.float().item() for k, v in steps.iteration(step, iter(batches).__next__).items()}


def _train(steps, iterations: int, first: int = 0) -> None:
    for step, batches in enumerate(_batches(steps.device, iterations, first), start=first):
        _iterate(steps, step, batches)


def _parameters(steps) -> list[torch.Tensor]:
    """Each network's parameters as one fp32 vector (E, G, T)."""
    return [torch.cat([p.detach().float().flatten() for p in m.parameters()]) for m in steps.modules()]


@torch.no_grad()
def _copy_state(dst, src) -> None:
    """dst's networks (buffers too), optimizer moments and steps, loss scales and estimator state set
    to src's, in place: a captured graph goes on reading and writing the same tensors."""
    for m, n in zip(dst.modules(), src.modules(), strict=True):
        for a, b in zip(m.state_dict().values(), n.state_dict().values(), strict=True):
            a.copy_(b)
    for u, v in ((dst.energy_update, src.energy_update), (dst.generator_update, src.generator_update)):
        for p, q in zip(u._params, v._params, strict=True):
            for key, value in u.optimizer.state[p].items():
                value.copy_(v.optimizer.state[q][key])
        if u.scaler.is_enabled():
            u.scaler._scale.copy_(v.scaler._scale)
            u.scaler._growth_tracker.copy_(v.scaler._growth_tracker)
    for key, value in dst.entropy_state.items():
        value.copy_(src.entropy_state[key])


# Per precision: the metrics' relative (and absolute) tolerance, and the parameters' (see below).
TOLERANCE = {"no": (1e-5, 1e-3), "bf16": (2e-2, 0.1), "fp16": (2e-2, 0.1)}


def _assert_iterations_agree(captured, eager, iterations: int, precision: str, first: int = 0) -> None:
    """Iteration by iteration from the same state (eager's copied into the captured run before each):
    the same metrics, the same estimator state, and per network parameters that differ by at most
    rtol of how far the iteration moved them.

    Not whole trajectories: a rounding difference between the two runs (another kernel, the captured
    optimizer's fp32 learning-rate tensor against eager's Python float) is amplified by training, and
    Adam turns a near-zero gradient's rounding into an lr-sized step either way. Measured on a CPU
    (this comparison, eight iterations, the update perturbed by 1e-7 to 1e-6 of lr): parameters
    3e-6 apart in fp32 and up to 1.7e-2 in bf16/fp16 per iteration, but 0.2-0.35 after eight
    iterations of free-running trajectories in bf16/fp16. A capture bug moves whole networks: a
    replay on a stale batch 0.56-0.66 (E and G), on the same noise every iteration 1.1-1.8 (G and T);
    test_the_comparison_catches_stale_inputs below shows that it fails then."""
    metrics_rtol, params_rtol = TOLERANCE[precision]
    trained = [0, 0, 0]  # iterations that moved each network (fp16 may skip every step of one)
    for step, batches in enumerate(_batches(eager.device, iterations, first), start=first):
        _copy_state(captured, eager)
        before = _parameters(eager)
        got, expected = _iterate(captured, step, batches), _iterate(eager, step, batches)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=metrics_rtol, abs=metrics_rtol), (step, key)
        for network, (p, q, p0) in enumerate(zip(_parameters(captured), _parameters(eager), before, strict=True)):
            moved = (q - p0).norm().item()
            trained[network] += moved > 0
            assert (p - q).norm().item() <= params_rtol * moved, (step, network, (p - q).norm().item(), moved)
        for key, value in eager.entropy_state.items():
            torch.testing.assert_close(captured.entropy_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(trained), trained  # a comparison of networks that never trained would prove nothing


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("penalty_every", [1, 2])
def test_captured_steps_match_eager_steps(fused_kernels, device, precision, penalty_every):
    captured = _steps("auto", precision, f"train.penalty_every={penalty_every}")
    eager = _steps("off", precision, f"train.penalty_every={penalty_every}")
    assert captured.capture == (device.type == "cuda")
    _assert_iterations_agree(captured, eager, 8, precision)


@pytest.mark.parametrize("estimator", ["dv", "nwj", "infonce", "smile", "vera"])
def test_captured_steps_match_eager_steps_for_every_entropy_estimator(fused_kernels, device, estimator):
    # Inside a captured step: DV's moving average is a device tensor updated in place by every replay,
    # VERA's output and posterior noise are drawn on the device by the default generator.
    extra = (f"train.entropy_estimator={estimator}", "train.entropy.infonce.negatives=3", "train.penalty_every=2")
    captured, eager = _steps("auto", "no", *extra), _steps("off", "no", *extra)
    assert captured.capture == (device.type == "cuda")
    _assert_iterations_agree(captured, eager, 8, "no")
    if estimator == "dv":
        assert eager.entropy_state["count"].item() == 8


class _StaleInputs:
    """The captured run of a replay bug: every iteration trains on the first iteration's batch, or
    draws the first iteration's z, permutations and noise."""

    def __init__(self, steps, stale: str):
        self.steps, self.stale, self.first = steps, stale, None

    def __getattr__(self, name):
        return getattr(self.steps, name)

    def iteration(self, step, next_batch):
        if self.stale == "noise":
            torch.manual_seed(100)
            return self.steps.iteration(step, next_batch)
        self.first = self.first if self.first is not None else next_batch()
        return self.steps.iteration(step, lambda: self.first)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("stale", ["batch", "noise"])
def test_the_comparison_catches_stale_inputs(fused_kernels, device, precision, stale):
    # The comparison's tolerances leave room for rounding: this shows they leave none for a replay
    # that repeats its first inputs.
    stale_run, eager = _StaleInputs(_steps("off", precision), stale), _steps("off", precision)
    with pytest.raises(AssertionError):
        _assert_iterations_agree(stale_run, eager, 3, precision)


def test_capture_is_redone_after_a_checkpoint_load(fused_kernels, device):
    # Loading an older checkpoint (a resume, a divergence rollback) puts new state tensors into the
    # optimizers. A graph still pointing at the old ones would go on with the newer moments, which
    # the comparison's copy of eager's state (into the tensors the optimizer now holds) would not reach.
    # The checkpoint is the eager run's (capturable=False param groups): the captured run must capture
    # again after loading it, not fall back to eager.
    captured, eager = _steps("auto", "no"), _steps("off", "no")
    _assert_iterations_agree(captured, eager, 2, "no")
    networks = [copy.deepcopy(m.state_dict()) for m in eager.modules()]
    optimizers = [copy.deepcopy(u.optimizer.state_dict()) for u in (eager.energy_update, eager.generator_update)]
    _assert_iterations_agree(captured, eager, 4, "no", first=2)  # captured by now
    if device.type == "cuda":
        assert captured._energy_fns[True].graph is not None and captured._generator_fn.graph is not None
    for steps in (captured, eager):
        for module, state in zip(steps.modules(), networks):
            module.load_state_dict(state)
        for update, state in zip((steps.energy_update, steps.generator_update), optimizers):
            update.optimizer.load_state_dict(copy.deepcopy(state))
        steps.after_checkpoint_load()
    _assert_iterations_agree(captured, eager, 5, "no", first=2)
    if device.type == "cuda":
        assert captured._energy_fns[True].graph is not None and captured._generator_fn.graph is not None


def _agree_while_captures_fail(steps, eager, update, precision: str, monkeypatch, caplog) -> str:
    """Eight iterations compared with eager while every capture of ``update``'s step fails after its
    optimizer step (a host sync there, which capture forbids); returns what capture logged."""
    step = update.step

    def step_then_sync():
        skipped = step()
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return skipped

    monkeypatch.setattr(update, "step", step_then_sync)
    with caplog.at_level(logging.WARNING, logger="trainer.capture"):
        _assert_iterations_agree(steps, eager, 8, precision)
    return caplog.text


def test_a_capture_that_fails_after_the_scaler_step_falls_back_to_eager(fused_kernels, device, monkeypatch, caplog):
    # A capture that fails after GradScaler.step() (here: a host sync, which capture forbids) leaves the
    # scaler believing this optimizer stepped; without discarding that, the eager fallback raises
    # "step() has already been called since the last update()".
    steps, eager = _steps("auto", "fp16"), _steps("off", "fp16")
    update = steps.energy_update
    if device.type == "cuda":
        logged = _agree_while_captures_fail(steps, eager, update, "fp16", monkeypatch, caplog)
        assert "capture off for energy_step(penalty=True)" in logged
        assert steps._energy_fns[True].failed and steps._generator_fn.graph is not None
        assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not the capture's stream
        return
    # No capture on a CPU: leave the scaler as such a capture leaves it, and discard the step.
    _train(steps, 1)
    update.scaler.step(update.optimizer)
    with pytest.raises(RuntimeError, match="already been called"):
        update.step()
    steps._after_failed_capture(update)
    assert all(p.grad is None for p in steps.energy.parameters())
    _train(steps, 2, first=1)  # eager steps run again


def test_a_failed_capture_has_the_graphs_captured_before_it_captured_again(fused_kernels, device, monkeypatch, caplog):
    # The energy step is captured in the second iteration, the generator step's capture fails in the
    # fourth. Releasing the device generator from the aborted capture gives it a new state object; the
    # energy graph, left as it was, would go on replaying MALA's noise with the old one, from the eager
    # draws' offsets and deaf to torch.manual_seed. It is dropped and captured again instead.
    mala = ["train.negatives=mala", "train.negatives_mala.steps=2"]
    steps, eager = _steps("auto", "no", *mala), _steps("off", "no", *mala)
    update = steps.generator_update
    if device.type == "cuda":
        logged = _agree_while_captures_fail(steps, eager, update, "no", monkeypatch, caplog)
        assert "capture off for generator_step" in logged
        assert steps._generator_fn.failed and steps._energy_fns[True].graph is not None
        return
    # No capture on a CPU: the failure handler on steps given graphs discards the step and drops them.
    _train(steps, 1)
    graphed = {flag: GraphedStep(fn) for flag, fn in steps._energy_fns.items()}
    for fn in graphed.values():
        fn.graph, fn.calls = object(), WARMUP_CALLS  # as if captured
    monkeypatch.setattr(steps, "_energy_fns", graphed)
    steps._after_failed_capture(update)
    assert all(p.grad is None for m in (steps.generator, steps.statistics) for p in m.parameters())
    assert all(fn.graph is None and fn.calls == 0 and not fn.failed for fn in graphed.values())


@pytest.mark.parametrize(
    "precision, extra",
    [
        ("no", []),
        ("fp16", []),
        ("no", ["train.negatives=mala", "train.negatives_mala.steps=2"]),
        ("no", ["train.entropy_estimator=dv"]),
        ("fp16", ["train.entropy_estimator=vera"]),
        ("no", ["train.entropy_estimator=infonce", "train.entropy.infonce.negatives=3"]),
    ],
)
def test_an_eager_iteration_never_syncs_with_the_host(fused_kernels, device, precision, extra):
    steps = _steps("off", precision, *extra)
    x = torch.randn(8, 3, 28, 28, device=steps.device)
    steps.iteration(0, lambda: x)  # lazy initialisation (optimizer state, loss scale) may sync once
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            steps.iteration(step, lambda: x)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def test_prometheus_exports_the_devices_memory_per_rank(tmp_path, device):
    from prometheus_client import generate_latest

    from trainer.config import LogConfig
    from trainer.prometheus import GPU_MEMORY, PrometheusExporter

    held = torch.ones(1 << 20, device=device)  # 4 MiB the allocator must report
    exp = PrometheusExporter(LogConfig(prometheus_port=0), "gpu", 0, 0, device, 10, 1, {})
    try:
        body = generate_latest(exp.registry).decode()
    finally:
        exp.close()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line[:1] != "#"}
    if device.type != "cuda":  # the dry run: no CUDA allocator to read, and no series claiming one
        assert not any(k.startswith("meg_gpu_memory") for k in series)
        return
    for name in GPU_MEMORY:
        assert series[f'meg_gpu_memory_{name}_bytes{{rank="0",run="gpu"}}'] >= held.numel() * 4, name
