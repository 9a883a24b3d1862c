"""Configuration: presets, dotted overrides, and clear errors before anything runs."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from trainer.config import ConfigError, RunConfig, _build, config_to_yaml, load_config, parse_yaml, resolve_preset


def test_preset_and_overrides_resolve_with_types():
    cfg = load_config("toy_25gaussians", ["train.steps=7", "train.energy_optim.lr=1e-3", "model.hidden=[8, 8]"])
    assert cfg.train.steps == 7 and cfg.train.energy_optim.lr == pytest.approx(1e-3)
    assert cfg.model.hidden == [8, 8] and cfg.data.toy == "25gaussians"
    assert cfg.output_dir == "runs/toy_25gaussians"
    # The saved YAML (config.yaml of every run and checkpoint) loads back to the same configuration.
    assert _build(RunConfig, parse_yaml(config_to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; valid keys here: steps"),
        ("train.steps=many", "train.steps must be int"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.mixed_precision=fp8", "choose one of no, bf16, fp16"),
        ("model.arch=transformer", "model.arch='transformer' is not valid; choose one of mlp, conv"),
        ("model.hidden=[8, x]", "model.hidden[1] must be int"),
        ("nokey", "must look like section.key=value"),
        ("data=3", "data must be a mapping"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("toy_25gaussians", [override])


def test_missing_and_malformed_presets(tmp_path):
    with pytest.raises(ConfigError, match="presets: .*toy_25gaussians"):
        resolve_preset("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(scalar))


def test_cli_reports_config_errors_without_traceback():
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", "train.lr=1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config key 'train.lr'" in result.stderr
    assert "Traceback" not in result.stderr


def test_printed_config_loads_back_to_the_same_configuration(tmp_path):
    # What --print-config shows (and every run saves as config.yaml) must load back to the same run:
    # YAML 1.1 would read the printed mixed_precision "no" or capture "off" back as a boolean.
    overrides = ["train.steps=7", "train.mixed_precision=no", "train.capture=off", "eval.toy.std=0.02"]
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", "--print-config", *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert load_config(str(printed)) == load_config("toy_25gaussians", overrides)


def test_a_preset_inherits_its_base_and_overrides_it_section_by_section(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: kdd99\nname: child\ntrain: {steps: 7}\neval: {kdd: {percentile: 90.0}}\n")
    cfg, base = load_config(str(child)), load_config("kdd99")
    assert (cfg.name, cfg.train.steps, cfg.eval.kdd.percentile) == ("child", 7, 90.0)
    # everything else comes from the base, including the other keys of the sections it touched
    assert cfg.train.penalty_weight == base.train.penalty_weight and cfg.eval.kdd.test_data == base.eval.kdd.test_data
    assert cfg.model == base.model and cfg.data == base.data


def test_presets_that_inherit_in_a_circle_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="inherit in a circle"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_missing_evaluation_file_stops_the_run_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "fashion_mnist_mlp", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "eval.fid.reference=stats/fashion_train.npz does not exist" in result.stderr
    assert "python -m trainer.fid --data data/fashion-mnist/train --out stats/fashion_train.npz" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_preset_loads_and_says_how_to_make_its_data(preset):
    cfg = load_config(preset, [])
    assert cfg.name and cfg.train.steps > 0
    # Presets on real data carry the command that writes their shards (shown when they are missing).
    assert cfg.data.toy or cfg.data.prepare, f"{preset}: neither data.toy nor data.prepare is set"
