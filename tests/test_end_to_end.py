"""The real trainer as a user runs it: outputs, resume equality, SIGKILL recovery, clear failures."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import load_file

from data_pipeline.stream import StreamPosition
from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from trainer.checkpoint import TrainState
from trainer.config import ConfigError, load_config


def _final_weights(run_dir, step, ema=False):
    weights = load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"energy", "generator", "statistics"} | (
        {"generator_ema"} if ema else set()
    )
    return [weights]


@pytest.mark.slow
def test_short_toy_run_writes_everything(tmp_path):
    args = [o for o in tiny_overrides(tmp_path) if not o.startswith(("eval.", "log.prometheus"))]
    args += ["eval.every=10", "eval.num_samples=500", "eval.mala.steps=3", "log.prometheus_port=0"]
    result = run_trainer(args)
    run = tmp_path / "run"
    assert "from scratch" in result.stdout and "finished: " in result.stdout
    # auto kernels and capture on a CPU: eager, and the run says why it does not capture
    assert "kernels eager, capture off: CUDA graphs need a CUDA device, this run is on cpu" in result.stdout
    assert "prometheus metrics: http://127.0.0.1:" in result.stdout
    cfg_text = (run / "config.yaml").read_text()
    assert "steps: 20" in cfg_text and "toy_std: 0.01768" in cfg_text and "kind: toy" in cfg_text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "energy_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for key in (
        "energy_loss",
        "generator_loss",
        "energy_gap",
        "penalty",
        "mi_estimate",
        "sample_spread",
        "samples_per_s",
        "step_time_s",
    ):
        assert key in train[-1]
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in train)
    evals = json.loads((run / "eval" / "latest.json").read_text())
    assert evals["step"] == 20 and evals["num_modes"] == 25
    assert 0 <= evals["high_quality_share"] <= 1 and 0 <= evals["mala_acceptance_rate"] <= 1
    for png in (
        "samples_step_00000010.png",
        "samples_mala_step_00000020.png",
        "energy_step_00000020.png",
        "curves.png",  # the loss curves, redrawn at each evaluation
    ):
        assert (run / "eval" / png).stat().st_size > 1000
    # step 0: the divergence guard's fallback; then every checkpoint.every steps.
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000000", "step_00000010", "step_00000020"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator, ema",
    [("jsd", 0.0), ("jsd", 0.8), ("dv", 0.0), ("vera", 0.0)],  # dv: a moving average; vera: its scales in T's place
)
def test_resume_gives_the_same_parameters_as_a_straight_run(tmp_path, estimator, ema):
    # With train.generator_ema on, G's average is in the export and comes back on resume: the
    # resumed run's average equals the straight run's (a resume that restarted it at G would not).
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = [f"train.entropy_estimator={estimator}", f"train.generator_ema={ema}"]
    run_trainer(tiny_overrides(straight, steps=20) + extra)
    run_trainer(tiny_overrides(split, steps=10) + extra)
    resumed = run_trainer(tiny_overrides(split, steps=20) + extra)
    assert "resumed from step 10" in resumed.stdout and "no generator EMA" not in resumed.stdout
    for a, b in zip(_final_weights(straight / "run", 20, ema > 0), _final_weights(split / "run", 20, ema > 0)):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] == b[key]).all(), key
        if ema:  # the average lags G: the comparison above covers a tensor of its own
            lagging = [k for k in a if k.startswith("generator.") and not (a[k] == a["generator_ema" + k[9:]]).all()]
            assert lagging
    states = [
        json.loads((run / "run" / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
        for run in (straight, split)
    ]
    assert states[0]["entropy_state"] == states[1]["entropy_state"]
    if estimator == "dv":  # the moving average went through the checkpoint, not restarted at step 10
        assert states[0]["entropy_state"]["count"] == 20.0


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["dv", "nwj", "infonce", "smile", "vera"])
def test_a_short_toy_run_with_each_entropy_estimator_finishes_and_evaluates(tmp_path, estimator):
    args = tiny_overrides(tmp_path, steps=6) + [f"train.entropy_estimator={estimator}", "train.penalty_every=2"]
    result = run_trainer(args)
    assert "finished: " in result.stdout
    evals = json.loads((tmp_path / "run" / "eval" / "latest.json").read_text())
    assert evals["step"] == 6 and evals["num_modes"] == 25 and 0 <= evals["high_quality_share"] <= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "mi_estimate" in r]
    assert train and all(math.isfinite(r["mi_estimate"]) and math.isfinite(r["generator_loss"]) for r in train)
    # A resume with another estimator is refused before anything of the run folder changes.
    other = "jsd" if estimator != "jsd" else "dv"
    refused = run_trainer(tiny_overrides(tmp_path, steps=8) + [f"train.entropy_estimator={other}"], check=False)
    assert refused.returncode == 2 and "train.entropy_estimator" in refused.stderr


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path):
    args = tiny_overrides(tmp_path, steps=400)
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", *args]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [n for n in os.listdir(checkpoints) if not n.endswith(".partial")] if checkpoints.exists() else []
            if len(done) >= 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = max(int(n[5:13]) for n in os.listdir(checkpoints) if not n.endswith(".partial"))
    resumed = run_trainer(args)
    resumed_from = int(resumed.stdout.split("resumed from step ")[1].split(";")[0])
    assert resumed_from >= last and resumed_from % 10 == 0
    assert (checkpoints / "step_00000400").is_dir()
    assert not [n for n in os.listdir(checkpoints) if n.endswith(".partial")]


@pytest.mark.slow
def test_half_written_checkpoint_is_never_loaded(tmp_path):
    args = tiny_overrides(tmp_path, steps=10)
    run_trainer(args)
    # A save that crashed leaves only a .partial folder: a later checkpoint that is incomplete.
    partial = tmp_path / "run" / "checkpoints" / "step_00000015.partial"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"garbage")
    result = run_trainer(tiny_overrides(tmp_path, steps=20))
    assert "resumed from step 10" in result.stdout


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_term(tmp_path):
    # A NaN weight is refused at load, naming its key; weights blown up by a learning rate of 1e38
    # make the losses non-finite within a few steps, and with no rollback allowed the run stops.
    refused = run_trainer(tiny_overrides(tmp_path) + ["train.penalty_weight=.nan"], check=False)
    assert refused.returncode == 2 and "train.penalty_weight=nan is out of range" in refused.stderr
    blown = ["train.energy_optim.lr=1e38", "train.generator_optim.lr=1e38", "train.guard.max_rollbacks=0"]
    result = run_trainer(tiny_overrides(tmp_path) + blown, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"non-finite \w+ = (nan|inf|-inf) at step \d+", result.stderr), result.stderr[-2000:]


@pytest.mark.slow
def test_missing_data_fails_before_training(tmp_path):
    args = tiny_overrides(tmp_path) + ["data.toy=", f"data.url={tmp_path / 'nowhere'}"]
    result = run_trainer(args, check=False)
    assert result.returncode == 2
    assert "no manifest at" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_toy_data_of_other_settings_fails_before_training(tmp_path):
    from data_pipeline.convert import convert_toy

    convert_toy("25gaussians", str(tmp_path / "data"), 4096, 4, seed=0)  # tiny_overrides' data, published std
    result = run_trainer(tiny_overrides(tmp_path) + ["data.toy_std=0.3"], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    expected = f"error: data.url={tmp_path / 'data'} holds data written with other settings than this run's: "
    assert result.stderr.splitlines()[-1].startswith(expected + "data.toy_std=0.3 (the data: 0.0176803). Give")
    assert not (tmp_path / "run").exists()


DIVERGING = ["train.energy_optim.lr=3.0", "train.guard.max_abs_energy_gap=50"]


@pytest.mark.slow
def test_diverging_run_is_rolled_back_with_lower_lr_and_recovers(tmp_path):
    result = run_trainer(tiny_overrides(tmp_path, steps=30) + DIVERGING + ["train.guard.lr_factor=0.001"])
    assert "divergence: out-of-bound (|x| > 50) energy_gap" in result.stdout
    assert "rolled back to step 0 with learning rates x0.001" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] == 0
    train = [r for r in records if "energy_gap" in r]
    assert train[-1]["step"] == 30 and abs(train[-1]["energy_gap"]) < 50
    assert train[-1]["lr_energy"] == 3.0 * 0.001
    assert train[-1]["lr_generator"] == pytest.approx(load_config("toy_25gaussians").train.generator_optim.lr * 0.001)


@pytest.mark.slow
def test_diverging_run_stops_cleanly_after_k_rollbacks_and_resumes_once_fixed(tmp_path):
    overrides = (
        tiny_overrides(tmp_path, steps=30) + DIVERGING + ["train.guard.lr_factor=1.0", "train.guard.max_rollbacks=2"]
    )
    result = run_trainer(overrides, check=False)
    assert result.returncode == 2
    assert result.stdout.count("divergence:") == 2
    assert "2 rollback(s) did not help. Stopping. A restart resumes from the newest intact checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    # No checkpoint holds weights the guard would flee: each one resumes (the exploding run left a
    # resumable run folder), here with a sane learning rate, to the end.
    fixed = [o for o in overrides if not o.startswith("train.energy_optim.lr")] + ["train.energy_optim.lr=1e-3"]
    resumed = run_trainer(fixed)
    assert "resumed from step" in resumed.stdout and "finished:" in resumed.stdout


def test_each_rank_resumes_from_its_own_stream_position():
    # Rank 1 ended an epoch early (a corrupt shard): its position differs from rank 0's.
    saved = TrainState(rank=0, world_size=2)
    saved.step, saved.position = 40, StreamPosition(3, 10)
    saved.rank_positions = [{"epoch": 3, "batches_done": 10}, {"epoch": 4, "batches_done": 1}]
    state = saved.to_json()  # what the main process writes
    for rank, expected in [(0, StreamPosition(3, 10)), (1, StreamPosition(4, 1))]:
        resumed = TrainState(rank=rank, world_size=2)
        resumed.load_json(state)
        assert (resumed.step, resumed.position) == (40, expected)
    # another world size reassigns the shards: every rank takes rank 0's position
    resumed = TrainState(rank=2, world_size=4)
    resumed.load_json(state)
    assert resumed.position == StreamPosition(3, 10)


@pytest.mark.slow
def test_starting_over_sets_the_earlier_run_aside(tmp_path):
    # checkpoint.resume=false in a used folder: the earlier run's later checkpoints must not outrank
    # the new run's (the sample tool and the next resume take the newest), nor its metrics mix in.
    run = tmp_path / "run"
    run_trainer(tiny_overrides(tmp_path, steps=20))
    earlier_config = (run / "config.yaml").read_text()
    again = [o for o in tiny_overrides(tmp_path, steps=5) if not o.startswith(("checkpoint.", "model.hidden"))]
    again += ["checkpoint.resume=false", "checkpoint.every=5", "model.hidden=[16,16]"]
    result = run_trainer(again)
    assert "from scratch" in result.stdout
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000000", "step_00000005"]
    [aside] = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert f"moved to {aside}" in result.stderr
    assert sorted(os.listdir(aside / "checkpoints")) == ["step_00000000", "step_00000010", "step_00000020"]
    assert (aside / "config.yaml").read_text() == earlier_config
    assert load_config(str(run / "config.yaml")).model.hidden == [16, 16]
    assert (aside / "eval" / "latest.json").exists() and (aside / "metrics.jsonl").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5
    # The new run is the folder's run now: it resumes (finished) with its own settings.
    resumed = run_trainer([o for o in again if o != "checkpoint.resume=false"])
    assert "resumed from step 5" in resumed.stdout


def test_starting_over_with_settings_the_run_refuses_leaves_the_earlier_run_in_place(tmp_path, monkeypatch):
    # The earlier run was moved aside, then an evaluation setting refused the new one (eval.kdd.protocol=paper
    # with too few steps): the folder was left with previous-*/ alone.
    from trainer import job

    run = tmp_path / "run"
    job.run(load_config("toy_25gaussians", tiny_overrides(tmp_path, steps=5)), threading.Event())
    before = sorted(os.listdir(run))

    def refused(*args, **kwargs):
        raise ConfigError("eval.kdd.protocol=paper averages the last 10 epochs, and train.steps=5 reaches 1")

    monkeypatch.setattr(job, "build_evaluator", refused)
    again = load_config("toy_25gaussians", [*tiny_overrides(tmp_path, steps=5), "checkpoint.resume=false"])
    with pytest.raises(ConfigError, match="reaches 1"):
        job.run(again, threading.Event())
    assert sorted(os.listdir(run)) == before and "checkpoints" in before
