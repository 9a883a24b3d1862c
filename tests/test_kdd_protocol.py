"""KDD Cup 99 by the paper's protocol: the epoch-end evaluation steps, the averaging over the last
epochs and over the splits, and the tool end to end on a small KDD-shaped file."""

import gzip
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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


def test_a_split_whose_evaluation_wrote_a_nan_as_null_averages_to_nan_not_a_dropped_metric(tmp_path):
    # Strict JSON writes a NaN score as null: read back as a value mean_std skips, the split's mean of that
    # metric vanished from protocol.json without a word.
    import math

    from trainer import strict_json
    from trainer.kdd_protocol import epoch_evaluations

    (tmp_path / "eval").mkdir()
    for step, auprc in ((10, 0.5), (20, float("nan"))):
        record = {"step": step, "energy_f1": 0.9, "energy_auprc": auprc, "settings": {"seed": 0}}
        (tmp_path / "eval" / f"step_{step:08d}.json").write_text(strict_json.dumps(record))
    summary = split_summary(epoch_evaluations(str(tmp_path)), 2)
    assert summary["energy_f1"] == pytest.approx(0.9) and math.isnan(summary["energy_auprc"])


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
    # Rerun with another penalty weight, the finished splits trained nothing and were reported under it, and
    # their config.yaml said the new weight.
    trained_with = (out / "split_0" / "config.yaml").read_text()
    rerun = subprocess.run(
        cmd + overrides + ["train.penalty_weight=1"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 2 and "train.penalty_weight was 100.0, now 1.0" in rerun.stderr, rerun.stderr[-3000:]
    assert (out / "split_0" / "config.yaml").read_text() == trained_with
    assert json.loads((out / "protocol.json").read_text()) == record


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


def finished_runs(trained: list[str], status: int = 0):
    """Stands in for trainer/main.py (subprocess.run): each run it is given finishes at once, with a checkpoint
    and two epoch evaluations (the last two epochs), and its folder's name is added to ``trained``."""

    def run(cmd, **kwargs):
        run_dir = Path(dict(arg.split("=", 1) for arg in cmd if "=" in arg)["output_dir"])
        trained.append(run_dir.name)
        if status == 0:
            (run_dir / "checkpoints" / "step_00000020").mkdir(parents=True, exist_ok=True)
            (run_dir / "eval").mkdir(exist_ok=True)
            for step in (10, 20):
                record = {"step": step, "kind": "kdd", "energy_f1": 0.5}
                (run_dir / "eval" / f"step_{step:08d}.json").write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, status)

    return run


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_with_another_csv_or_other_settings_is_refused_before_it_reuses_the_splits(
    tmp_path, monkeypatch, capsys
):
    """A rerun into an existing --out reused its split data (never reading the new --csv) and resumed its
    finished runs, which trained nothing: the table was the old runs' under the new settings."""
    from trainer import kdd_protocol

    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(500).encode()))
    garbage = tmp_path / "x.gz"
    garbage.write_text("hello")
    out = tmp_path / "o"
    trained = []
    monkeypatch.setattr(kdd_protocol.subprocess, "run", finished_runs(trained))
    settings = ["--splits", "1", "eval.kdd.last_epochs=2"]
    assert kdd_protocol.main(["--csv", str(csv), "--out", str(out), *settings]) == 0
    record = json.loads((out / "protocol.json").read_text())
    assert record["csv"] == {"path": str(csv), "sha256": hashlib.sha256(csv.read_bytes()).hexdigest()}
    made = files_under(out)
    capsys.readouterr()
    cases = [
        (["--csv", str(csv), "--out", str(out), *settings, "train.penalty_weight=1", "train.energy_optim.lr=0.01"],
         "train.penalty_weight was 100.0, now 1.0; train.energy_optim.lr was 0.0001, now 0.01."),
        (["--csv", str(garbage), "--out", str(out), *settings],
         f"--csv {garbage} is not the file its splits were made from ({csv}, sha256 "),
    ]  # fmt: skip
    for argv, says in cases:
        assert kdd_protocol.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
        assert f"rerun with --csv {csv} --config kdd99 eval.kdd.last_epochs=2; for these, give a new --out" in err
        assert trained == ["split_0"] and files_under(out) == made
    # The same file elsewhere and the same settings resume; more splits add runs beside the finished one.
    copy = tmp_path / "copy.gz"
    copy.write_bytes(csv.read_bytes())
    assert kdd_protocol.main(["--csv", str(copy), "--out", str(out), *settings, "eval.kdd.splits=2"]) == 0
    assert kdd_protocol.main(["--csv", str(copy), "--out", str(out), "--splits", "2", "eval.kdd.last_epochs=2"]) == 0
    assert trained == ["split_0", "split_0", "split_0", "split_1"]
    assert len(json.loads((out / "protocol.json").read_text())["splits"]) == 2


def test_the_settings_may_change_until_a_split_has_trained_and_the_csv_until_its_data_is_written(
    tmp_path, monkeypatch, capsys
):
    """A run that refused its settings is fixed and rerun into the same --out, as the protocol tells."""
    from trainer import kdd_protocol

    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(500).encode()))
    other = tmp_path / "other.gz"
    other.write_bytes(gzip.compress(fake_kdd(500, seed=1).encode()))
    out = tmp_path / "o"
    trained = []
    monkeypatch.setattr(kdd_protocol.subprocess, "run", finished_runs(trained, status=2))
    assert kdd_protocol.main(["--csv", str(csv), "--out", str(out), "--splits", "1", "train.steps=5"]) == 2
    monkeypatch.setattr(kdd_protocol.subprocess, "run", finished_runs(trained))
    assert kdd_protocol.main(["--csv", str(other), "--out", str(out), "--splits", "1", "eval.kdd.last_epochs=2"]) == 2
    assert "is not the file its splits were made from" in capsys.readouterr().err
    assert kdd_protocol.main(["--csv", str(csv), "--out", str(out), "--splits", "1", "eval.kdd.last_epochs=2"]) == 0
    assert trained == ["split_0", "split_0"]


def test_an_out_begun_before_the_inputs_were_recorded_is_refused(tmp_path, monkeypatch, capsys):
    """Its CSV and settings are unknown; each split's config.yaml is rewritten by any rerun, so it is no witness."""
    from trainer import kdd_protocol

    csv = tmp_path / "kdd.gz"
    csv.write_bytes(gzip.compress(fake_kdd(500).encode()))
    out = tmp_path / "o"
    argv = ["--csv", str(csv), "--out", str(out), "--splits", "1", "eval.kdd.last_epochs=2"]
    trained = []
    monkeypatch.setattr(kdd_protocol.subprocess, "run", finished_runs(trained))
    assert kdd_protocol.main(argv) == 0
    (out / "protocol_inputs.json").unlink(missing_ok=True)
    made = files_under(out)
    capsys.readouterr()
    assert kdd_protocol.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds splits made before the protocol recorded its CSV and settings" in err
    assert f"give a new --out, or move {out} aside to start over" in err
    assert trained == ["split_0"] and files_under(out) == made
    # A damaged record is said as such, not a traceback: not JSON, a key missing, a value of the wrong type.
    wrong_type = '{"csv": {"path": "k"}, "settings": null, "config": "kdd99", "overrides": []}'
    for damaged in ("{not json", '{"csv": "kdd.gz"}', wrong_type):
        (out / "protocol_inputs.json").write_text(damaged)
        assert kdd_protocol.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out / 'protocol_inputs.json'} is damaged (") and err.count("\n") == 1, err
    # An empty folder holds nothing made: it is taken as --out.
    (tmp_path / "empty").mkdir()
    assert kdd_protocol.main(["--csv", str(csv), "--out", str(tmp_path / "empty"), *argv[4:]]) == 0
