"""Damaged inputs (binary manifest or metrics, odd run-folder entries, data as output_dir) are named up front."""

import json
import re
import threading

import numpy as np
import pytest

from data_pipeline.cli import UserError
from data_pipeline.shards import DataError, read_manifest, write_array_shards
from tests.conftest import run_trainer, tiny_overrides
from trainer.config import ConfigError, load_config

BINARY = b"\xff\xfe\x80 not text \x00\x9c"


def _listing(folder) -> dict[str, bytes | None]:
    """Each entry's bytes (None for a folder)."""
    return {p.name: None if p.is_dir() else p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_manifest_that_is_not_utf8_is_a_data_error_naming_it(tmp_path):
    # It was a UnicodeDecodeError traceback from the trainer and the classifier.
    (tmp_path / "manifest.json").write_bytes(BINARY)
    with pytest.raises(
        DataError, match=re.escape(f"manifest {tmp_path / 'manifest.json'} is not UTF-8 text")
    ) as refused:
        read_manifest(str(tmp_path))
    assert "convert the data set again" in str(refused.value)


def test_lines_of_metrics_jsonl_that_are_not_utf8_are_left_out_of_the_curves(tmp_path):
    # It was a UnicodeDecodeError at the run's first evaluation, after the steps and the save.
    from trainer.plots import loss_curves

    metrics = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": step, "energy_loss": 1.0 / step}).encode() for step in (1, 2)]
    metrics.write_bytes(
        b"\n".join(
            [good[0], BINARY, b'{"step": 3, "energy_loss": "\xe9"}', b"{half", b"42", b'{"energy_loss": 1}', good[1]]
        )
        + b"\n"
    )
    loss_curves(str(tmp_path / "curves.png"), str(metrics))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_uses_a_newest_checkpoint_without_files_json_with_one_warning(tmp_path, capsys):
    # It warned "using it unverified", then refused the same checkpoint: "files.json is missing".
    from trainer.evaluate import main

    run_trainer([*tiny_overrides(tmp_path, steps=4), "checkpoint.every=2"])
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    (newest / "files.json").unlink()
    assert main(["--run", str(tmp_path / "run"), "eval.num_samples=200", "eval.mala.steps=0"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint {newest} has no files.json: using it unverified"]
    assert (tmp_path / "run" / "eval" / "eval_step_00000004.json").is_file()


def test_a_fled_checkpoint_is_read_with_a_warning_and_an_unfinished_save_is_refused(tmp_path, capsys):
    # Both were read without a word: a .fled checkpoint no resume takes, and a .partial save's leftover.
    import shutil

    from trainer.sample import main

    run_trainer([*tiny_overrides(tmp_path, steps=4), "checkpoint.every=2"])
    checkpoints = tmp_path / "run" / "checkpoints"
    fled = checkpoints / "step_00000002.fled"
    (checkpoints / "step_00000002").rename(fled)
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000006.partial")
    small = ["--num", "50", "--mala-steps", "0", "--npy", str(tmp_path / "s.npy")]
    assert main(["--run", str(tmp_path / "run"), "--checkpoint", "step_00000002.fled", *small]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {fled} is one the divergence guard fled" in err
    assert main(["--run", str(tmp_path / "run"), "--checkpoint", "step_00000006.partial", *small]) == 2
    assert "is a save that did not finish (.partial), never a checkpoint" in capsys.readouterr().err


def test_a_checkpoint_fled_again_under_its_numbered_name_is_read_with_the_warning_too(tmp_path, capsys):
    # The guard sets a second checkpoint fled at one step aside as step_N.fled2 (.fled3, ...): it is no
    # more a resume's than step_N.fled, and was read without the warning.
    from trainer.run_folder import resolve_checkpoint

    run_trainer([*tiny_overrides(tmp_path, steps=2), "checkpoint.every=2"])
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000002").rename(checkpoints / "step_00000002.fled2")
    assert resolve_checkpoint(str(tmp_path / "run"), "step_00000002.fled2") == str(checkpoints / "step_00000002.fled2")
    assert "is one the divergence guard fled" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["trainer.sample", "trainer.evaluate"])
def test_a_given_checkpoint_without_files_json_is_used_with_a_warning(tmp_path, capsys, tool):
    # It was refused ("files.json is missing"), where the newest checkpoint and a resume use it.
    import importlib

    run_trainer([*tiny_overrides(tmp_path, steps=4), "checkpoint.every=2"])
    given = tmp_path / "run" / "checkpoints" / "step_00000002"
    (given / "files.json").unlink()
    small = (
        ["--num", "100", "--mala-steps", "0"]
        if tool == "trainer.sample"
        else ["eval.num_samples=200", "eval.mala.steps=0"]
    )
    main = importlib.import_module(tool).main
    assert main(["--run", str(tmp_path / "run"), "--checkpoint", str(given), *small]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint {given} has no files.json: using it unverified"]


@pytest.mark.parametrize(
    "name, says",
    [
        ("checkpoints", "is not a folder, where the trainer keeps its checkpoints folder"),
        ("eval", "is not a folder, where the trainer keeps its eval folder"),
        ("metrics.jsonl", "is a folder, where the trainer keeps its metrics.jsonl file"),
        ("config.yaml", "is a folder, where the trainer keeps its config.yaml file"),
        (".lock", "is a folder, where the trainer keeps its .lock file"),
    ],
)
def test_a_run_folder_entry_of_the_wrong_kind_is_refused_before_any_work(tmp_path, name, says):
    # A file as eval/ was refused at the first evaluation (after the steps and a save), a file as
    # checkpoints/ at the first save (after "from scratch" and a new config.yaml).
    from trainer.job import run

    folder = tmp_path / "run"
    folder.mkdir()
    if name in ("checkpoints", "eval"):
        (folder / name).write_text("a file of the user's")
    else:
        (folder / name).mkdir()
    before = _listing(folder)
    with pytest.raises(UserError, match=re.escape(f"{folder / name} {says}: move it out of the run folder")) as refused:
        run(load_config("toy_25gaussians", tiny_overrides(tmp_path)), threading.Event())
    assert str(refused.value).endswith("or train into another output_dir.")
    assert _listing(folder) == before and not (tmp_path / "data").exists()


@pytest.mark.parametrize("data_there", [True, False])
def test_an_output_dir_that_is_the_data_folder_is_refused_before_any_work(tmp_path, data_there):
    # The run's config.yaml, checkpoints and metrics were written among the data set's shards.
    from trainer.job import run

    data = tmp_path / "data"
    if data_there:
        points = np.zeros((64, 2), np.float32)
        write_array_shards(str(data), "points", "train", points, np.zeros(64, np.int64), 2)
        says = f"output_dir={data} holds a data set (manifest.json)"
    else:
        says = f"output_dir={data} is data.url's folder ({data})"
    before = _listing(data) if data_there else {}
    overrides = [*tiny_overrides(tmp_path), f"output_dir={data}"]
    with pytest.raises(ConfigError, match=re.escape(f"{says}: the run's files would mix")) as refused:
        run(load_config("toy_25gaussians", overrides), threading.Event())
    assert str(refused.value).endswith("choose another output_dir")
    if data_there:
        assert _listing(data) == before
    else:
        assert not data.exists()


@pytest.mark.parametrize("tool", ["trainer.sample", "trainer.evaluate"])
def test_an_unverified_checkpoint_whose_config_names_another_arch_is_one_error_line(tmp_path, capsys, tool):
    # An edited config.yaml in a checkpoint without files.json: model.arch=conv for 2-D points was
    # models.factory's ValueError traceback; other hidden sizes were a dozen lines of load_state_dict's.
    import importlib

    run_trainer([*tiny_overrides(tmp_path, steps=2), "checkpoint.every=2"])
    given = tmp_path / "run" / "checkpoints" / "step_00000002"
    (given / "files.json").unlink()
    config = (given / "config.yaml").read_text()
    main = importlib.import_module(tool).main
    small = ["--num", "10", "--mala-steps", "0"] if tool == "trainer.sample" else ["eval.num_samples=10"]
    for edited, says in (
        (config.replace("arch: mlp", "arch: conv", 1), "the conv arch takes square (C, H, W) images"),
        (config.replace("  - 32\n", "  - 16\n", 1), "size mismatch for"),
    ):
        assert edited != config
        (given / "config.yaml").write_text(edited)
        assert main(["--run", str(tmp_path / "run"), "--checkpoint", str(given), *small]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and says in err
        error = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert len(error) == 1 and error[0].startswith(f"error: {given}: its config.yaml does not describe")


def test_a_run_folder_no_file_can_be_made_in_is_refused_before_the_sampling(tmp_path, monkeypatch, capsys):
    # A colleague's run or a read-only mount: evaluate ran the whole evaluation (FID, MALA: hours), and
    # sample drew its samples, then each failed naming a temporary file ("eval_step_....json.tmp-3894").
    from data_pipeline import cli
    from trainer import evaluate, sample
    from trainer.evaluation import sampling

    run_trainer([*tiny_overrides(tmp_path, steps=2), "checkpoint.every=2"])
    run = str(tmp_path / "run")
    refuses = lambda folder: "refuses new files: Read-only file system" if folder.startswith(run) else None  # noqa: E731
    monkeypatch.setattr(cli, "cannot_write_in", refuses)
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("sampled before the refusal"))
    assert evaluate.main(["--run", run, "eval.num_samples=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {run}/eval refuses new files: Read-only file system: evaluate writes its results into the run's "
        "eval/ folder; make it writable, or evaluate a copy of the run folder"
    )
    assert sample.main(["--run", run, "--num", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run} refuses new files") and err.endswith("unless --out says where; give --out")

    class Sampled(BaseException):  # --out elsewhere: the run folder is only read, and the sampling starts
        pass

    def reached(*args, **kwargs):
        raise Sampled

    monkeypatch.setattr(sampling, "generate", reached)
    with pytest.raises(Sampled):
        sample.main(["--run", run, "--num", "10", "--out", str(tmp_path / "elsewhere.png")])
