"""KDD Cup 99 by the paper's protocol: the epoch-end evaluation steps, the averaging over the last
epochs and over the splits, and the tool end to end on a small KDD-shaped file."""

import gzip
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.cli import ConfigError
from tests.conftest import REPO_ROOT, subprocess_env
from tests.test_data_convert import fake_kdd
from trainer.evaluation.anomaly import mean_std, protocol_steps
from trainer.kdd_protocol import aggregate, split_summary


def test_protocol_steps_are_the_last_epoch_ends_counted_back_from_the_end():
    assert protocol_steps(100, 10, 3) == [80, 90, 100]
    assert protocol_steps(95, 10, 3) == [75, 85, 95]  # a run that ends mid-epoch: epochs end one apart
    assert protocol_steps(25, 10, 10) == [5, 15, 25]  # no evaluation at step <= 0
    with pytest.raises(ValueError):
        protocol_steps(10, 0, 3)


def test_split_summary_averages_only_the_last_epochs_and_refuses_too_few():
    records = [{"step": s, "kind": "kdd", "energy_f1": f} for s, f in ((10, 0.0), (20, 0.5), (30, 0.7), (40, 0.9))]
    assert split_summary(records, 3) == pytest.approx({"energy_f1": 0.7})  # 0.0 (epoch 1) left out
    with pytest.raises(ConfigError, match="4 epoch evaluations"):
        split_summary(records, 5)


def test_aggregate_is_mean_and_population_std_over_splits():
    per_split = [
        {"energy_f1": 0.9, "energy_auroc": 0.95},
        {"energy_f1": 0.94, "energy_auroc": 0.97},
        {"energy_f1": 0.95},
    ]
    summary = aggregate(per_split)
    assert set(summary) == {"energy_f1"}  # a key missing from one split is not averaged over the others
    assert summary["energy_f1"]["mean"] == pytest.approx(0.93)
    assert summary["energy_f1"]["std"] == pytest.approx(np.std([0.9, 0.94, 0.95]))
    assert summary["energy_f1"]["n"] == 3
    assert mean_std([{"kind": "kdd", "flag": True, "x": 1}]) == {"x": {"mean": 1.0, "std": 0.0, "n": 1}}


@pytest.mark.slow
def test_protocol_tool_end_to_end(tmp_path):
    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(3000).encode()))
    out = tmp_path / "paper"
    overrides = [
        "train.steps=12", "eval.kdd.epoch_steps=3", "eval.kdd.last_epochs=3", "data.batch_size=64",
        "data.num_workers=1", "model.hidden=[16,16]", "model.generator_hidden=[16,16]", "model.z_dim=4",
        "log.every=3", "log.prometheus_port=-1", "checkpoint.every=6",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "trainer.kdd_protocol", "--csv", str(csv), "--out", str(out), "--splits", "2"]
    result = subprocess.run(
        cmd + overrides, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "protocol.json").read_text())
    for split in record["splits"]:
        # The trainer evaluated at the ends of the last 3 epochs of 3 steps, and only there.
        evaluations = sorted((out / f"split_{split['split']}" / "eval").glob("step_*.json"))
        assert (
            [p.name for p in evaluations]
            == [f"step_{s:08d}.json" for s in (6, 9, 12)]
            == [f"step_{s:08d}.json" for s in split["steps"]]
        )
        values = [json.loads(p.read_text())["energy_f1"] for p in evaluations]
        assert split["epoch_mean"]["energy_f1"] == pytest.approx(np.mean(values))
    # The two splits are different data (seeds 0 and 1) and the summary is over their epoch means.
    means = [s["epoch_mean"]["energy_auroc"] for s in record["splits"]]
    assert record["summary"]["energy_auroc"]["mean"] == pytest.approx(np.mean(means))
    assert record["summary"]["energy_auroc"]["std"] == pytest.approx(np.std(means))
    assert record["splits"][0]["epoch_mean"] != record["splits"][1]["epoch_mean"]
    assert "energy" in result.stdout and "±" in result.stdout


def test_protocol_tool_names_what_would_stop_its_first_run_before_writing_data(tmp_path, capsys):
    """A missing --csv and an uninstallable tracker were found after split 0's data was written (or
    its conversion begun), and a refused setting was reported as a run to resume."""
    from trainer import kdd_protocol

    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(500).encode()))
    (tmp_path / "afile").write_text("")
    cases = [
        (["--csv", str(tmp_path / "none.gz"), "--out", str(tmp_path / "o")], "--csv"),
        (["--csv", str(csv), "--out", str(tmp_path / "afile")], "is a file: give a folder"),
        # A preset that scores something else trained split 0, then failed in the energy (1.1 GB written).
        (["--csv", str(csv), "--out", str(tmp_path / "o"), "--config", "toy_25gaussians"], "eval.kind=toy; the KDD"),
        # Overrides of what each split's run is given were dropped without a word.
        (["--csv", str(csv), "--out", str(tmp_path / "o"), "output_dir=elsewhere"], "the protocol sets output_dir="),
        (["--csv", str(csv), "--out", str(tmp_path / "o"), "train.seed=3"], "train.seed=N for each split N"),
    ]
    if importlib.util.find_spec("wandb") is None:  # the dev environment has no wandb
        cases.append((["--csv", str(csv), "--out", str(tmp_path / "o"), "log.trackers=[wandb]"], "has wandb"))
    for argv, says in cases:
        assert kdd_protocol.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_trainer_refuses_a_protocol_run_too_short_for_its_last_epochs_before_step_0(tmp_path):
    """trainer/kdd_protocol.py found it after the whole run: "1 epoch evaluations, the protocol averages 10"."""
    from data_pipeline.cli import ConfigError
    from trainer.config import load_config
    from trainer.evaluation import extra_evaluation_steps

    class Stream:
        def batches_per_epoch(self, epoch):
            return 8

    paper = ["eval.kdd.protocol=paper", "train.energy_steps=1", "eval.kdd.last_epochs=3"]
    assert extra_evaluation_steps(load_config("kdd99", ["train.steps=24", *paper]), Stream()) == {8, 16, 24}
    assert extra_evaluation_steps(load_config("kdd99", ["train.steps=17", *paper]), Stream()) == {1, 9, 17}
    with pytest.raises(
        ConfigError, match=r"train.steps=16 reaches 2 of them \(epochs of 8 steps\): raise train.steps to at least 17"
    ):
        extra_evaluation_steps(load_config("kdd99", ["train.steps=16", *paper]), Stream())


def test_a_run_that_refuses_its_settings_is_not_reported_as_one_to_resume(tmp_path, monkeypatch, capsys):
    from trainer import kdd_protocol

    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(500).encode()))
    for status, says in ((2, "the run refused its settings (see above); fix them and rerun"),
                         (1, "the run ended with status 1; rerun this command to resume it")):  # fmt: skip
        ended = subprocess.CompletedProcess([], status)
        monkeypatch.setattr(kdd_protocol.subprocess, "run", lambda *a, ended=ended, **k: ended)
        assert kdd_protocol.main(["--csv", str(csv), "--out", str(tmp_path / "o"), "--splits", "1"]) == status
        assert f"split 0: {says}" in capsys.readouterr().err
