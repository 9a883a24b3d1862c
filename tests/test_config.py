"""Configuration: presets, dotted overrides, and clear errors before anything runs."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from tests.conftest import REPO_ROOT
from trainer.config import (
    MAX_YAML_DEPTH,
    ConfigError,
    RunConfig,
    _build,
    config_from_yaml,
    config_to_yaml,
    in_range,
    load_config,
    parse_yaml,
    resolve_preset,
)


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
        ("train.steps=0", "train.steps=0 is out of range"),
        ("train.mixed_precision=fp8", "choose one of no, bf16, fp16"),
        ("model.arch=transformer", "model.arch='transformer' is not valid; choose one of mlp, conv"),
        ("model.hidden=[8, x]", "model.hidden[1] must be int"),
        ("nokey", "must look like section.key=value"),
        ("data=3", "data must be a mapping"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
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
    for text in ("", "# train:\n#   steps: 10\n", "null\n"):  # a truncated preset trained every default
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match="empty.yaml holds no settings"):
            load_config(str(empty))


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


def test_a_base_beside_its_preset_is_found_from_any_working_folder(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "common.yaml").write_text("base: kdd99\ntrain: {steps: 11}\n")
    (tmp_path / "mine" / "run.yaml").write_text("base: common\nname: run\n")
    monkeypatch.chdir(tmp_path)  # neither configs/ nor the working folder holds common.yaml
    cfg = load_config("mine/run.yaml")
    assert (cfg.name, cfg.train.steps, cfg.eval.kind) == ("run", 11, "kdd")
    (tmp_path / "mine" / "lost.yaml").write_text("base: nowhere\n")
    with pytest.raises(ConfigError, match=r"^mine/lost.yaml: base: no config file or preset 'nowhere'; presets: "):
        load_config("mine/lost.yaml")


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
    # Training shards: the command as given (unquoted, the shell expanded the braces into two arguments;
    # quoted, meg-fid wanted a manifest in "wds/d-{0..1}.tar/") did not work. Their index decodes the images
    # as the run does (else RGB at their stored size: statistics of other images).
    shards = "wds/d-{000000..000001}.tar"
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "fashion_mnist_mlp", f"output_dir={tmp_path / 'run'}",
         f"data.url={shards}", "data.image_mode=l", "data.image_size=28"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"make it from the training shards: index them into a data set with `python -m data_pipeline.convert index "
        f"--shards '{shards}' --image-mode l --image-size 28 --out FOLDER` (it writes only a manifest) and give "
        "FOLDER to `python -m trainer.fid "
        "--data FOLDER --out stats/fashion_train.npz`"
    ) in result.stderr, result.stderr


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_preset_loads_and_says_how_to_make_its_data(preset):
    cfg = load_config(preset, [])
    assert cfg.name and cfg.train.steps > 0
    # Presets on real data carry the command that writes their shards (shown when they are missing).
    assert cfg.data.toy or cfg.data.prepare, f"{preset}: neither data.toy nor data.prepare is set"


# -- bounded input: YAML and value ranges ----------------------------------------------------------


def _laughs(levels: int = 9) -> str:
    """ "Billion laughs": each level an alias list of the one before (9 levels: 9**9 strings)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_preset_is_refused_at_once(tmp_path):
    preset = tmp_path / "laughs.yaml"
    preset.write_text(_laughs())
    assert preset.stat().st_size < 600
    # Refused at the first anchor, before any expansion (which took 22 minutes and 1.7 GB).
    with pytest.raises(ConfigError, match="anchors and aliases") as err:
        load_config(str(preset))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_single_alias_is_refused_too():
    with pytest.raises(ConfigError, match="anchors and aliases"):
        parse_yaml("model: &m {z_dim: 2}\nother: *m\n")


@pytest.mark.parametrize("depth", [MAX_YAML_DEPTH + 1, 20_000])
def test_a_deeply_nested_preset_is_one_clear_error(tmp_path, depth):
    preset = tmp_path / "deep.yaml"
    preset.write_text("name: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_YAML_DEPTH} levels"):
        load_config(str(preset))  # not RecursionError
    assert parse_yaml("a: " + "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)) is not None


def test_a_preset_over_a_mebibyte_is_refused_unparsed(tmp_path):
    preset = tmp_path / "big.yaml"
    preset.write_text("name: meg\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="at most 1048576"):
        load_config(str(preset))


def test_a_checkpoint_config_that_is_not_a_configuration_names_its_file():
    with pytest.raises(ConfigError, match="ckpt/config.yaml must hold a mapping"):
        config_from_yaml("[1, 2]", "ckpt/config.yaml")
    with pytest.raises(ConfigError, match="ckpt/config.yaml: train.steps=-3 is out of range"):
        config_from_yaml("train: {steps: -3}", "ckpt/config.yaml")
    with pytest.raises(ConfigError, match="ckpt/config.yaml is not valid YAML: nested deeper"):
        config_from_yaml("a: " + "[" * 20_000, "ckpt/config.yaml")


def test_a_huge_value_is_cut_short_in_the_message():
    with pytest.raises(ConfigError) as err:
        load_config("toy_25gaussians", ["model.arch=" + "x" * 100_000])
    assert len(str(err.value)) < 300 and "100002 characters" in str(err.value)


# One invalid value per kind of range; each must be refused naming its key.
BAD_VALUES = [
    ("model.hidden=[]", "model.hidden must have"),
    ("model.hidden=[0]", "model.hidden[0]=0 is out of range"),
    ("model.hidden=[-5]", "model.hidden[0]=-5 is out of range"),
    ("model.generator_hidden=[8, 0]", "model.generator_hidden[1]=0"),
    ("model.z_dim=0", "model.z_dim=0"),
    ("model.energy_negative_slope=-0.1", "model.energy_negative_slope"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data.shuffle_buffer=-2", "data.shuffle_buffer=-2"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.image_size=100000", "data.image_size=100000 is out of range"),
    ("data.max_sample_bytes=-1", "data.max_sample_bytes=-1"),
    ("data.max_corrupt_share=nan", "data.max_corrupt_share=nan"),
    ("train.guard.lr_factor=nan", "train.guard.lr_factor=nan"),
    ("train.guard.lr_factor=-0.5", "train.guard.lr_factor=-0.5"),
    ("train.guard.max_penalty=-1", "train.guard.max_penalty=-1"),
    ("train.guard.max_rollbacks=-1", "train.guard.max_rollbacks=-1"),
    ("train.seed=-1", "train.seed=-1"),
    ("train.seed=4294967296", "train.seed=4294967296"),
    ("eval.seed=99999999999999999999999", "eval.seed=99999999999999999999999"),
    ("train.energy_optim.betas=[0.5]", "train.energy_optim.betas must have exactly 2 items"),
    ("train.energy_optim.betas=[0.5, 0.9, 0.99]", "train.energy_optim.betas must have exactly 2 items"),
    ("train.generator_optim.betas=[0.5, 1.0]", "train.generator_optim.betas[1]=1.0 is out of range"),
    ("train.energy_optim.lr=nan", "train.energy_optim.lr=nan is out of range"),
    ("train.energy_optim.lr=-1e-4", "train.energy_optim.lr=-0.0001"),
    ("train.generator_optim.lr=0", "train.generator_optim.lr=0.0"),
    ("train.energy_optim.weight_decay=-1", "train.energy_optim.weight_decay"),
    ("train.penalty_weight=nan", "train.penalty_weight=nan"),
    ("train.penalty_weight=1e400", "train.penalty_weight=inf"),
    ("train.entropy_weight=0", "train.entropy_weight=0.0"),
    ("train.lr_decay_fraction=1.5", "train.lr_decay_fraction=1.5"),
    ("train.negatives_mala.step_size=0", "train.negatives_mala.step_size=0.0"),
    ("eval.mala.temperature=-1", "eval.mala.temperature=-1.0"),
    ("eval.num_samples=0", "eval.num_samples=0"),
    ("eval.kdd.percentile=101", "eval.kdd.percentile=101.0"),
    ("eval.toy.std=-1", "eval.toy.std=-1.0"),
    ("checkpoint.keep=0", "checkpoint.keep=0"),
    ("log.prometheus_port=70000", "log.prometheus_port=70000"),
    ("deepspeed.zero_stage=-1", "deepspeed.zero_stage=-1"),
    ("name=../escape", "name='../escape' is not valid"),
    ("name=a/b", "name='a/b' is not valid"),
    ("name=..", "name='..' is not valid"),
    ("name=", "name='' is not valid"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0][:40] for b in BAD_VALUES])
def test_an_out_of_range_value_is_refused_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("toy_25gaussians", [override])


def test_values_at_the_edges_of_their_ranges_load():
    cfg = load_config(
        "toy_25gaussians",
        ["train.seed=4294967295", "train.energy_optim.betas=[0.0, 0.999]", "data.num_workers=0", "name=run_1.b-2",
         "train.guard.max_rollbacks=0", "data.image_size=8192", "train.penalty_weight=0"],
    )  # fmt: skip
    assert cfg.train.seed == 2**32 - 1 and cfg.output_dir == "runs/run_1.b-2"


def _config_fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _config_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind, f


def test_every_numeric_config_field_declares_a_range_its_default_is_in():
    numeric = 0
    for key, kind, f in _config_fields(RunConfig):
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        if item in (int, float):
            numeric += 1
            assert "range" in f.metadata, f"{key} ({kind}) has no range in its field metadata"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for value in default if isinstance(default, list) else [default]:
                assert in_range(value, f.metadata["range"]), (key, value, f.metadata["range"])
    assert numeric >= 40  # the walk reached every section


@pytest.mark.parametrize(
    "preset, override, named",
    [
        ("stackedmnist", "model.hidden=[8]", "model.hidden"),
        ("stackedmnist", "model.generator_batch_norm=true", "model.generator_batch_norm"),
        ("toy_25gaussians", "model.conv_width=8", "model.conv_width"),
    ],
)
def test_a_key_of_the_other_architecture_is_refused_naming_it(preset, override, named):
    with pytest.raises(ConfigError, match=rf"{re.escape(named)}\b.*not read by model\.arch="):
        load_config(preset, [override])


def test_every_preset_sets_only_keys_its_architecture_reads():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(path.stem)


def test_switching_a_presets_architecture_drops_its_widths_but_not_the_overrides():
    cfg = load_config("toy_25gaussians", ["model.arch=conv", "model.conv_width=4"])  # the preset's MLP widths go
    assert cfg.model.arch == "conv" and cfg.model.conv_width == 4
    with pytest.raises(ConfigError, match=r"model\.hidden: not read by model\.arch=conv"):
        load_config("toy_25gaussians", ["model.arch=conv", "model.hidden=[8]"])


def test_what_fsdp_does_not_support_is_refused_at_load():
    with pytest.raises(ConfigError, match="train.generator_ema averages whole generator weights"):
        load_config("toy_25gaussians", ["train.engine=fsdp", "train.generator_ema=0.99"])
    with pytest.raises(ConfigError, match="train.entropy_estimator=vera is not supported with train.engine=fsdp"):
        load_config("toy_25gaussians", ["train.engine=fsdp", "train.entropy_estimator=vera"])


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.mixed_precision=fp16"], "train.mixed_precision=no or bf16"),
        (["train.entropy_estimator=vera"], "train.entropy_estimator=vera"),
        (["train.generator_ema=0.99"], "train.generator_ema"),
    ],
)
def test_fsdp_refusals_come_from_the_config_check(overrides, named):
    # Every setting the FSDP2 engine cannot run is refused when the config loads, before any process
    # group or network exists, each naming the key.
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, ["train.engine=fsdp", *overrides])


def test_a_section_given_in_part_keeps_its_fields_default_for_the_rest():
    # train.negatives_mala defaults to 5 steps (MALAConfig's own default is 0): setting only its
    # temperature once turned MALA negatives off without a word.
    cfg = load_config("toy_25gaussians", ["train.negatives=mala", "train.negatives_mala.temperature=0.03"])
    assert (cfg.train.negatives_mala.steps, cfg.train.negatives_mala.temperature) == (5, 0.03)
    cfg = load_config(None, ["eval.mala.step_size=0.02"])
    assert (cfg.eval.mala.steps, cfg.eval.mala.step_size) == (5, 0.02)
    assert load_config("kdd99", ["eval.mala.step_size=0.02"]).eval.mala.steps == 0  # the preset's own value stays


def test_a_key_given_twice_is_refused_naming_it_its_line_and_the_file(tmp_path):
    preset = tmp_path / "dup.yaml"
    preset.write_text(
        "base: toy_25gaussians\ntrain: {steps: 3, energy_steps: 1}\nmodel: {z_dim: 2}\ntrain: {steps: 4}\n"
    )
    with pytest.raises(ConfigError, match=r"dup\.yaml .*duplicate key 'train' at line 4.*first at line 2"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match="duplicate key 'steps' at line 3, column 3"):
        parse_yaml("train:\n  steps: 3\n  steps: 4\n")
    assert parse_yaml("train: {steps: 3}\nmodel: {steps: 4}\n") == {"train": {"steps": 3}, "model": {"steps": 4}}


def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(monkeypatch, tmp_path):
    # The shell leaves data.url=~/x alone: the toy data went to $HOME/x (fsspec expands ~) while the
    # reader looked for ./~/x, and the run stopped with "shard ... has disappeared since start-up".
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        "toy_25gaussians",
        [
            "data.url=~/data::~/more",
            "output_dir=~/run",
            "eval.stackedmnist.classifier=~/c.pt",
            "log.prometheus_targets=~/t",
        ],
    )
    assert cfg.data.url == f"{tmp_path}/data::{tmp_path}/more" and cfg.output_dir == f"{tmp_path}/run"
    assert cfg.eval.stackedmnist.classifier == f"{tmp_path}/c.pt" and cfg.log.prometheus_targets == f"{tmp_path}/t"


def test_a_section_given_whole_on_the_command_line_keeps_the_presets_other_settings():
    preset = load_config("toy_25gaussians", [])
    whole = load_config("toy_25gaussians", ["train={steps: 5, energy_optim: {lr: 0.002}}"])
    assert whole.train.steps == 5 and whole.train.energy_optim.lr == 0.002
    assert whole.train.energy_optim.betas == preset.train.energy_optim.betas  # the preset's (0.5, 0.9)
    kept = dataclasses.replace(whole.train, steps=preset.train.steps, energy_optim=preset.train.energy_optim)
    assert kept == preset.train  # entropy_weight 0.03, lr decay, ...: they fell back to the code's defaults


def test_a_text_setting_takes_an_override_as_typed_and_a_preset_is_told_to_quote_it(tmp_path):
    # "output_dir must be str, got 2024 (int)"; name=2024-01-01 was a datetime.date.
    cfg = load_config("toy_25gaussians", ["output_dir=2024", "name=2024-01-01", "data.url=007"])
    assert (cfg.output_dir, cfg.name, cfg.data.url) == ("2024", "2024-01-01", "007")
    preset = tmp_path / "p.yaml"
    preset.write_text("name: 2024\n")
    with pytest.raises(
        ConfigError, match=r"name must be str, got 2024 \(int\): quote it in the YAML file, name: '2024'"
    ):
        load_config(str(preset), [])


def test_a_presets_mistake_names_the_file_that_set_it_and_an_overrides_does_not(tmp_path):
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text("base: kdd99\ntrain: {steps: many}\n")
    child.write_text(f"base: {base}\nmodel: {{z_dim: 4}}\neval: {{kdd: {{percentlie: 90.0}}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(child))
    assert str(caught.value) == f"{base}: train.steps must be int, got 'many' (str)"
    with pytest.raises(ConfigError) as caught:
        load_config(str(child), ["train.steps=5"])
    assert str(caught.value).startswith(f"{child}: unknown config key 'eval.kdd.percentlie'; valid keys here: ")
    assert load_config(str(base), ["train.steps=5"]).train.steps == 5  # an override mends a preset's value
    # The same mistake typed on the command line is the user's own: no file is blamed for it.
    with pytest.raises(ConfigError) as caught:
        load_config(str(base), ["train.steps=lots"])
    assert str(caught.value) == "train.steps must be int, got 'lots' (str)"


@pytest.mark.parametrize(
    "text, says",
    [
        ("trian: {steps: 3}\n", "unknown config key 'trian'; "),  # a misspelt section: its keys are the origins
        ("model: {conv_width: 16}\n", "model.conv_width: not read by model.arch=mlp"),  # the other architecture's
    ],
)
def test_a_presets_misspelt_section_or_other_architectures_key_names_the_file(tmp_path, text, says):
    # Both came without the file: origins are leaves (trian.steps), and the architecture check ran outside.
    preset = tmp_path / "mine.yaml"
    preset.write_text("base: toy_25gaussians\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(preset))
    assert str(caught.value).startswith(f"{preset}: {says}")


def test_an_override_splits_at_its_first_equals_sign_only():
    cfg = load_config("toy_25gaussians", ["output_dir=runs/lr=1e-3,beta=0.5"])
    assert cfg.output_dir == "runs/lr=1e-3,beta=0.5"


@pytest.mark.parametrize("override", ["train.steps=true", "data.batch_size=false", "train.energy_steps=yes"])
def test_a_boolean_is_not_taken_for_an_integer(override):
    # YAML reads true/false/yes as booleans, and bool is a subclass of int in Python: train.steps=true
    # would otherwise be a 1-step run.
    with pytest.raises(ConfigError, match=re.escape(f"{override.split('=')[0]} must be int")):
        load_config("toy_25gaussians", [override])


@pytest.mark.parametrize(
    "override, says",
    [("log.trackers=tensorboard", "(a list: log.trackers=[tensorboard])"), ("model.hidden=64", "model.hidden=[64]")],
)
def test_a_single_item_where_a_list_belongs_is_shown_the_list_it_would_be(override, says):
    with pytest.raises(ConfigError, match="must be a list of") as refused:
        load_config("toy_25gaussians", [override])
    assert says in str(refused.value)
