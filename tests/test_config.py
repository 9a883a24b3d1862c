"""Configuration: presets, dotted overrides, and clear errors before anything runs."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT
from trainer.config import ConfigError, config_to_yaml, load_config, resolve_preset


def test_preset_and_overrides_resolve_with_types():
    cfg = load_config("toy_25gaussians", ["train.steps=7", "train.energy_optim.lr=1e-3", "model.hidden=[8, 8]"])
    assert cfg.train.steps == 7 and cfg.train.energy_optim.lr == pytest.approx(1e-3)
    assert cfg.model.hidden == [8, 8] and cfg.data.toy == "25gaussians"
    assert cfg.output_dir == "runs/toy_25gaussians"
    # The saved YAML loads back to the same configuration.
    assert load_config(None, []).__class__(**{}) is not None
    tree = yaml.safe_load(config_to_yaml(cfg))
    assert tree["train"]["steps"] == 7 and tree["model"]["hidden"] == [8, 8]


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


def test_print_config_shows_every_section():
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", "--print-config"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    tree = yaml.safe_load(result.stdout)
    assert set(tree) >= {"model", "data", "train", "eval", "checkpoint", "log"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_preset_loads_and_says_how_to_make_its_data(preset):
    cfg = load_config(preset, [])
    assert cfg.name and cfg.train.steps > 0
    # Presets on real data carry the command that writes their shards (shown when they are missing).
    assert cfg.data.toy or cfg.data.prepare, f"{preset}: neither data.toy nor data.prepare is set"
