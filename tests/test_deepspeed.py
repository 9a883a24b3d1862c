"""DeepSpeed ZeRO 1/2 as the trainer's engine: same losses as DDP on 2 ranks, resume, ZeRO-3 refused.

Each 2-rank run is a real `accelerate launch` of trainer/main.py (about 15 s each on 2 cores).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, accelerate_launcher, run_trainer, subprocess_env, tiny_overrides
from trainer.config import ConfigError, DeepSpeedConfig, DeepSpeedConfigError, load_config
from trainer.runtime.deepspeed_engine import deepspeed_config

LOSSES = ("energy_loss", "generator_loss", "penalty", "energy_gap", "mi_estimate")
# ZeRO reduce-scatters and averages gradients in its own flat buckets, DDP all-reduces per bucket: the
# same mean of two gradients. Measured: bit-identical losses over 6 steps (difference 0.0) at 2 ranks in
# fp32; the bound allows for reordered sums on other hardware or world sizes.
REL_TOL = 1e-5


def _launch(tmp_path, name: str, extra: list[str], steps: int = 6) -> list[dict]:
    launcher, env = accelerate_launcher(2)
    args = [o for o in tiny_overrides(tmp_path / name, steps=steps) if not o.startswith(("log.every", "data.url"))]
    args += [f"data.url={tmp_path / 'data'}", "log.every=1", "checkpoint.every=3", *extra]
    result = run_trainer(args, launcher=launcher, env=env)
    assert '"ranks_in_sync": 1.0' in result.stdout
    engine = next((e for e in extra if e.startswith("deepspeed.zero_stage=")), None)
    assert (f"(deepspeed ZeRO-{engine[-1]}," if engine else "(ddp,") in result.stdout
    lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "energy_loss" in r]


# The DDP run, its ZeRO-2 twin, the ZeRO-2 resume and the bf16 run keep a generator EMA (decay 0.5: far
# from G within 6 steps); ZeRO-1 does not. The EMA leaves the losses alone, so every parity test holds.
EMA = ["train.generator_ema=0.5"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    runs = {"ddp": _launch(tmp, "ddp", EMA)}
    for stage in (1, 2):
        runs[f"zero{stage}"] = _launch(
            tmp,
            f"zero{stage}",
            [
                "train.engine=deepspeed",
                f"deepspeed.zero_stage={stage}",
                f"deepspeed.config_file=deploy/deepspeed/zero{stage}.json",
                *(EMA if stage == 2 else []),
            ],
        )
    bf16 = ["train.engine=deepspeed", "deepspeed.zero_stage=2", "train.mixed_precision=bf16", *EMA]
    runs["zero2_bf16"] = _launch(tmp, "zero2_bf16", bf16)
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_gives_the_ddp_losses_on_two_ranks(two_rank_runs, stage):
    _, runs = two_rank_runs
    ddp, zero = runs["ddp"], runs[f"zero{stage}"]
    assert [r["step"] for r in zero] == [r["step"] for r in ddp] == [1, 2, 3, 4, 5, 6]
    worst = 0.0
    for a, b in zip(ddp, zero, strict=True):
        for key in LOSSES:
            worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-3))
    print(f"ZeRO-{stage} vs DDP, worst relative loss difference over 6 steps: {worst:.2e}")
    assert worst < REL_TOL
    # The runs did move: a comparison of two frozen runs would prove nothing.
    assert ddp[0]["energy_loss"] != ddp[-1]["energy_loss"]


@pytest.mark.slow
def test_zero2_resume_is_exact_and_every_rank_saves(two_rank_runs):
    tmp, _ = two_rank_runs
    straight = tmp / "zero2" / "run" / "checkpoints" / "step_00000006"
    extra = ["train.engine=deepspeed", "deepspeed.zero_stage=2", *EMA]
    _launch(tmp, "split", extra, steps=3)
    _launch(tmp, "split", extra, steps=6)
    resumed = tmp / "split" / "run" / "checkpoints" / "step_00000006"
    for net in ("energy", "generator"):
        shards = sorted(p.name for p in (resumed / "engine" / net).iterdir())
        assert shards == [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    a, b = load_file(straight / "weights.safetensors"), load_file(resumed / "weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("statistics.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # G's average is in the export, resumed exactly (above), and not G itself.
    averaged = [k for k in a if k.startswith("generator_ema.")]
    assert averaged and any(not torch.equal(a[k], a["generator" + k[13:]]) for k in averaged)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["dv", "vera"])
def test_the_stateful_entropy_estimators_give_zero2_the_ddp_losses_and_resume_exactly(tmp_path, estimator):
    # Two ranks, the lazy penalty on: DV's moving average is averaged over the ranks and saved in
    # trainer_state.json; VERA's noise and posterior scales are T's parameters under either engine.
    # NWJ, InfoNCE and SMILE keep nothing beyond T, whose parameters ZeRO-2 holds as under the default
    # estimator (the parity test above); tests/test_end_to_end.py trains with each of them.
    extra = [f"train.entropy_estimator={estimator}", "train.penalty_every=2"]
    zero2 = ["train.engine=deepspeed", "deepspeed.zero_stage=2"]
    ddp, zero = _launch(tmp_path, "ddp", extra), _launch(tmp_path, "zero2", extra + zero2)
    # VERA: step 1 agrees to the last digit, then the engines' reductions round differently (1e-7 at
    # step 2) and its score, divided by sigma^2, amplifies that: measured 1.6e-4 relative by step 6
    # (generator_loss). The other estimators stay within REL_TOL.
    tol = 1e-3 if estimator == "vera" else REL_TOL
    for a, b in zip(ddp, zero, strict=True):
        for key in LOSSES:
            assert abs(a[key] - b[key]) <= tol * max(abs(a[key]), 1e-3), (estimator, a["step"], key)
    assert ddp[0]["mi_estimate"] != ddp[-1]["mi_estimate"]
    _launch(tmp_path, "split", extra + zero2, steps=3)
    _launch(tmp_path, "split", extra + zero2, steps=6)
    straight, resumed = (tmp_path / name / "run" / "checkpoints" / "step_00000006" for name in ("zero2", "split"))
    a, b = load_file(straight / "weights.safetensors"), load_file(resumed / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    states = [json.loads((path / "trainer_state.json").read_text())["entropy_state"] for path in (straight, resumed)]
    assert states[0] == states[1]
    assert estimator != "dv" or states[0]["count"] == 6.0


def test_zero3_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="double backward"):
        load_config("toy_25gaussians", ["train.engine=deepspeed", "deepspeed.zero_stage=3"])


def test_zero3_in_a_deepspeed_json_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match="ZeRO stage 3 is not supported"):
        deepspeed_config(DeepSpeedConfig(zero_stage=2, config_file=str(path)), "no", 32, 2)


@pytest.mark.slow
def test_zero3_run_exits_with_a_clear_error(tmp_path):
    result = run_trainer([*tiny_overrides(tmp_path), "train.engine=deepspeed", "deepspeed.zero_stage=3"], check=False)
    assert result.returncode == 2
    assert "ZeRO stage 3 is not supported" in result.stderr and "double backward" in result.stderr


def test_deepspeed_json_templates_are_valid():
    for stage in (1, 2):
        ds = deepspeed_config(
            DeepSpeedConfig(stage, str(REPO_ROOT / f"deploy/deepspeed/zero{stage}.json")), "bf16", 32, 2
        )
        assert ds["zero_optimization"]["stage"] == stage and ds["zero_allow_untested_optimizer"] is True
        assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["train_batch_size"] == 64


@pytest.mark.slow
def test_zero2_bf16_evaluates_the_weights_its_checkpoint_exports(two_rank_runs):
    # DeepSpeed's bf16 keeps bf16 weights in the modules and fp32 masters in the optimizer. The run's
    # own evaluation (at its last step) and meg-evaluate (on that step's export) must score the same
    # fp32 weights with the same draws: the same numbers.
    tmp, _ = two_rank_runs
    run = tmp / "zero2_bf16" / "run"
    tool = ["trainer.evaluate", "--run", str(run), "eval.plots=false"]
    result = subprocess.run([sys.executable, "-m", *tool], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    during = json.loads((run / "eval" / "step_00000006.json").read_text())
    after = json.loads((run / "eval" / "eval_step_00000006.json").read_text())
    assert "mala_high_quality_share" in during
    assert during == after


@pytest.mark.slow
def test_zero2_bf16_trains_all_three_updates_close_to_fp32_ddp(two_rank_runs):
    # DeepSpeed bf16 keeps bf16 weights with fp32 masters: the penalty and the three updates run in
    # bf16 through engine.module. Measured over 6 steps against fp32 DDP: energy_loss and energy_gap
    # (differences of energies of ~0.1) within 8e-4 absolute; penalty within 3.5% relative;
    # generator_loss and mi_estimate within 1e-3 relative. Bounds: 2e-3 absolute, 5e-2 relative.
    _, runs = two_rank_runs
    bf16 = runs["zero2_bf16"]
    assert all(r["skipped_steps"] == 0 for r in bf16)
    for a, b in zip(runs["ddp"], bf16, strict=True):
        for key in ("energy_loss", "energy_gap"):
            assert abs(a[key] - b[key]) < 2e-3, (a["step"], key, a[key], b[key])
        for key in ("penalty", "generator_loss", "mi_estimate"):
            assert abs(a[key] - b[key]) / abs(a[key]) < 5e-2, (a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_sample_and_evaluate_give_a_zero2_run_the_numbers_of_its_ddp_twin(two_rank_runs):
    # Both runs: the same seed, 2 ranks, fp32, 6 steps, a generator EMA; their losses agree (test above).
    # The tools read only each checkpoint's weights export (G's average in place of G), so they must
    # work on either and agree too.
    tmp, _ = two_rank_runs
    samples, evaluations = {}, {}
    for name in ("ddp", "zero2"):
        run = tmp / name / "run"
        npy = tmp / f"{name}_samples.npy"
        for tool in (
            ["trainer.sample", "--run", str(run), "--num", "500", "--mala-steps", "3", "--npy", str(npy)],
            ["trainer.evaluate", "--run", str(run), "eval.num_samples=500", "eval.mala.steps=3", "eval.plots=false"],
        ):
            result = subprocess.run([sys.executable, "-m", *tool], cwd=REPO_ROOT, env=subprocess_env(),
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            assert result.returncode == 0, result.stderr[-2000:]
        samples[name] = np.load(npy)
        evaluations[name] = json.loads((run / "eval" / "eval_step_00000006.json").read_text())
    assert np.abs(samples["ddp"] - samples["zero2"]).max() < 1e-4
    assert evaluations["ddp"].keys() == evaluations["zero2"].keys()
    for key, value in evaluations["ddp"].items():
        if key == "mode_mass_ratio":  # largest / smallest mode mass: the smallest can be e^-50 this early
            value, evaluations["zero2"][key] = math.log(value), math.log(evaluations["zero2"][key])
        # NaN: no sample near a mode yet, so no mode histogram (mode_kl_reverse), in both runs alike.
        expected = pytest.approx(value, rel=1e-3, abs=1e-4, nan_ok=True) if isinstance(value, float) else value
        assert evaluations["zero2"][key] == expected, key


def _zero2_save_with_a_full_disk(rank: int, port: int, results, folder: str, full: int) -> None:
    """One rank of a 2-rank ZeRO-2 run whose rank ``full`` finds its disk full at step 20: its optimizer
    shard and every file after it fail (rank 0's recovery scripts, copied outside DeepSpeed's checkpoint
    engine, too). What the run raised goes to ``results``."""
    import errno
    import os
    import threading

    import deepspeed.runtime.engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from trainer.job import run

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
    write, copy = TorchCheckpointEngine.save, deepspeed.runtime.engine.copyfile

    def full_disk(path):
        if rank == full and "step_00000020" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)

    def save(self, state_dict, path):
        full_disk(path)
        return write(self, state_dict, path)

    def copyfile(src, dst):
        full_disk(dst)
        return copy(src, dst)

    TorchCheckpointEngine.save, deepspeed.runtime.engine.copyfile = save, copyfile
    overrides = [
        *tiny_overrides(Path(folder), steps=30), "checkpoint.keep=1", "train.collective_timeout=60",
        "train.engine=deepspeed", "deepspeed.zero_stage=2",
        f"deepspeed.config_file={REPO_ROOT / 'deploy' / 'deepspeed' / 'zero2.json'}",
    ]  # fmt: skip
    try:
        run(load_config("toy_25gaussians", overrides), threading.Event())
        results.put((rank, "finished"))
    except Exception as e:  # noqa: BLE001 (what each rank raised is the result)
        results.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.slow
@pytest.mark.parametrize("full", [0, 1])
def test_a_zero_shard_one_rank_cannot_write_is_said_as_such_and_the_older_checkpoint_kept(tmp_path, full):
    # The rank raised from inside DeepSpeed's save, into the ranks' agreement on it, while the other waited
    # in DeepSpeed's own barrier: both hung for train.collective_timeout, then named a lost rank, not the disk.
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    ranks = [
        spawn.Process(target=_zero2_save_with_a_full_disk, args=(r, port, results, str(tmp_path), full)) for r in (0, 1)
    ]
    for p in ranks:
        p.start()
    said = dict(results.get(timeout=300) for _ in ranks)
    for p in ranks:
        p.join(60)
    final = tmp_path / "run" / "checkpoints" / "step_00000020"
    assert said[full].startswith(f"CheckpointError: could not write checkpoint {final}: No space left on device")
    assert said[1 - full].startswith(f"CheckpointError: could not write checkpoint {final}: another rank could not")
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_00000000", "step_00000010"]  # 0: the guard's
