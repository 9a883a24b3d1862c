"""The tools refuse a bad flag before any work: one line naming the flag and what is valid, exit 2."""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline import convert
from data_pipeline.cli import DataError
from data_pipeline.shards import read_manifest, write_array_shards
from tests.conftest import REPO_ROOT, subprocess_env
from trainer import classifier, evaluate, fid, kdd_protocol, sample


def _run(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's refusal
            code = e.code
    return code, err.getvalue()


def _refused(main, argv: list[str], *says: str) -> str:
    code, err = _run(main, argv)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert all(s in last for s in says), err
    return last


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--num", "-5", "[1, 10000000]"),
        ("--num", "0", "[1, 10000000]"),
        ("--mala-steps", "-1", "[0, 1000000]"),
        ("--step-size", "-1", "(0, inf)"),
        ("--temperature", "0", "(0, inf)"),
        ("--temperature", "nan", "(0, inf)"),
        ("--seed", "-1", "[0, 4294967295]"),
    ],
)
def test_sample_checks_its_flags_with_the_configs_ranges_before_loading(tmp_path, flag, value, says):
    # The run does not exist: the flag's error comes first, so nothing was loaded.
    _refused(sample.main, ["--run", str(tmp_path / "no-run"), flag, value], f"{flag}=", says)


@pytest.mark.parametrize("flag", ["--out", "--npy"])
def test_sample_refuses_a_folder_as_its_output_file(tmp_path, flag):
    _refused(sample.main, ["--run", str(tmp_path / "no-run"), flag, str(tmp_path)], f"{flag} {tmp_path} is a folder")


def test_sample_refuses_to_write_over_the_runs_own_files_or_one_output_over_the_other(tmp_path):
    # --npy <checkpoint>/weights.safetensors replaced the weights with the samples (exit 0).
    run = tmp_path / "run"
    weights = run / "checkpoints" / "step_00000020" / "weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    for flag, path in (("--npy", weights.parent / "x.npy"), ("--out", run / "checkpoints" / "x.png")):
        _refused(sample.main, ["--run", str(run), flag, str(path)], f"{flag} {path} would replace the run's own")
    for path in (weights, run / "metrics.jsonl"):  # and these are no .npy either
        _refused(sample.main, ["--run", str(run), "--npy", str(path)], f"--npy {path}")
    other = tmp_path / "elsewhere.npy"
    _refused(sample.main, ["--run", str(run), "--checkpoint", str(tmp_path), "--npy", str(other)], "run's own")
    both = str(tmp_path / "samples")  # no suffix passes either check
    _refused(sample.main, ["--run", str(run), "--out", both, "--npy", both], "--out and --npy are the same file")
    assert weights.read_bytes() == b"weights"


def test_sample_refuses_a_figure_format_it_does_not_write(tmp_path):
    # It wrote PNG bytes under any name (a .pdf that no viewer opens), after the sampling.
    out = str(tmp_path / "s.gif")
    _refused(sample.main, ["--run", str(tmp_path / "no-run"), "--out", out], f"--out {out}: .gif", ".png, .pdf, .svg")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["toy", "--num-samples", "0"], "--num-samples: must be at least 1, got 0"),
        (["toy", "--num-samples", "-4"], "--num-samples: must be at least 1, got -4"),
        (["toy", "--num-shards", "0"], "--num-shards: must be at least 1, got 0"),
        (["toy", "--num-shards", "-1"], "--num-shards: must be at least 1, got -1"),
        (["toy", "--seed", "-1"], "--seed: must be at least 0, got -1"),
        (["toy", "--num-shards", "two"], "--num-shards: 'two' is not a whole number"),
        (["toy", "--std", "-1"], "--std: must be a finite number >= 0, got -1"),  # was ignored, and recorded
        (["toy", "--std", "nan"], "--std: must be a finite number >= 0, got nan"),
        (["stackedmnist", "--num-samples", "0"], "--num-samples: must be at least 1"),
        (["kdd", "--csv", "k.csv", "--num-shards", "0"], "--num-shards: must be at least 1"),
        (["kdd", "--csv", "k.csv", "--anomaly-share", "1"], "--anomaly-share: must be between 0 and 1"),
        (["kdd", "--csv", "k.csv", "--anomaly-share", "nan"], "--anomaly-share: must be between 0 and 1"),
        (["mnist-anomaly", "--csv", "m.csv", "--digit", "10"], "--digit: invalid choice: 10"),
        (["mnist-anomaly", "--csv", "m.csv", "--digit", "1", "--train-fraction", "0"], "--train-fraction: must be"),
        # A name or split is part of the shard file names: ../ wrote them beside --out, over any file there.
        (["arrays", "--x", "x.npy", "--name", "../../precious"], "--name: '../../precious' cannot be part of a"),
        (["arrays", "--x", "x.npy", "--split", "a/b"], "--split: 'a/b' cannot be part of a file name"),
        (["images", "--folder", "f", "--name", ""], "--name: '' cannot be part of a file name"),
        (["index", "--shards", "s.tar", "--split", ".."], "--split: '..' cannot be part of a file name"),
        (["mnist", "--csv", "m.csv", "--split", ".hidden"], "--split: '.hidden' cannot be part of a file name"),
        (["images", "--folder", "f", "--size", "100000"], "--size: must be at most 8192, got 100000"),  # it hung
        (["webdataset", "--shards", "s.tar", "--image-size", "9000"], "--image-size: must be at most 8192"),
    ],
)
def test_convert_refuses_counts_below_their_minimum(tmp_path, argv, says):
    _refused(convert.main, [*argv, "--out", str(tmp_path / "o")], says)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("folder", ["a::b/data", "a{1..2}b", "odd}"])
def test_convert_refuses_an_out_the_trainer_would_read_as_shards(tmp_path, folder):
    # a::b: the manifest was written as a file "a" (fsspec's chain); a{1..2}b: "shard a1b/data does not exist".
    out = str(tmp_path / folder)
    _refused(convert.main, ["toy", "--out", out], f"--out: {out}: '::' and braces name shards in data.url")
    assert os.listdir(tmp_path) == []


def test_convert_refuses_a_folder_that_holds_an_earlier_data_set(tmp_path):
    out = str(tmp_path / "d")
    assert _run(convert.main, ["toy", "--num-samples", "64", "--num-shards", "8", "--out", out]) == (0, "")
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
    _refused(convert.main, ["toy", "--num-samples", "64", "--num-shards", "2", "--seed", "1", "--out", out],
             f"--out {out} is not empty", "remove")  # fmt: skip
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)} == before
    assert len(read_manifest(out).shards) == 8
    os.makedirs(tmp_path / "empty")
    assert (
        _run(convert.main, ["toy", "--num-samples", "64", "--num-shards", "2", "--out", str(tmp_path / "empty")])[0]
        == 0
    )


@pytest.mark.parametrize("argv, says", [(["--epochs", "0"], "--epochs: must be at least 1"),
                                        (["--epochs", "-2"], "--epochs: must be at least 1"),
                                        (["--seed", "-1"], "--seed: must be at least 0")])  # fmt: skip
def test_classifier_refuses_bad_counts(tmp_path, argv, says):
    _refused(classifier.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "c.pt"), *argv], says)


def test_classifier_refuses_a_folder_as_out_before_reading_the_data(tmp_path):
    _refused(
        classifier.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path)], f"--out {tmp_path} is a folder"
    )
    (tmp_path / "file").write_text("")
    _refused(classifier.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "file" / "c.pt")], "is a file")


def test_classifier_refuses_one_data_set_given_twice_before_reading_it(tmp_path):
    # Its digits landed in both the training and the held-out part: 0.61 held-out accuracy read as 0.92.
    data = str(tmp_path / "d")
    for twice in ([data, data], [data, data + "/"], [data, str(tmp_path / "." / "d")]):
        argv = [arg for url in twice for arg in ("--data", url)]
        _refused(classifier.main, [*argv, "--out", str(tmp_path / "c.pt")], "are one data set: give each once")


def test_classifier_refuses_a_data_set_smaller_than_one_batch(tmp_path):
    x, y = torch.zeros(100, 1, 28, 28), torch.arange(100) % 10
    with pytest.raises(DataError, match="85 to train on .* fewer than one batch of 128: give more --data"):
        classifier.train_classifier(x, y, epochs=1)
    write_array_shards(str(tmp_path / "d"), "digits", "test", np.zeros((100, 1, 28, 28), np.uint8),
                       np.arange(100) % 10, 1)  # fmt: skip
    _refused(classifier.main, ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "c.pt")], "fewer than one batch")
    assert not (tmp_path / "c.pt").exists()


def test_classifier_and_fid_name_a_data_set_of_another_shape_before_reading_any(tmp_path, monkeypatch):
    # Digits beside 2-D points: a traceback (torch.cat) after reading all; one wrong set was read whole first.
    from data_pipeline import stream

    write_array_shards(str(tmp_path / "digits"), "digits", "test", np.zeros((8, 1, 28, 28), np.uint8), np.arange(8), 1)
    write_array_shards(str(tmp_path / "points"), "toy", "train", np.zeros((8, 2), np.float32), np.zeros(8, np.int64), 1)
    monkeypatch.setattr(stream, "read_split", lambda *a, **k: pytest.fail("read before the shapes were checked"))
    out = tmp_path / "new" / "c.pt"
    data = ["--data", str(tmp_path / "digits"), "--data", str(tmp_path / "points")]
    _refused(classifier.main, [*data, "--out", str(out)], f"--data {tmp_path / 'points'} holds (2,)")
    assert not out.parent.exists()
    points = str(tmp_path / "points")
    _refused(fid.main, ["--data", points, "--out", str(tmp_path / "s.npz"), "--device", "cpu"],
             f"FID needs images, (1 or 3 channels, height, width); --data {points} holds (2,)")  # fmt: skip


def test_fid_refuses_a_negative_num_and_a_folder_as_out(tmp_path):
    _refused(fid.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "s.npz"), "--num", "-5"],
             "--num: must be at least 0, got -5")  # fmt: skip
    _refused(fid.main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path)], f"--out {tmp_path} is a folder")


def test_fid_names_a_wrong_device_or_feature_extractor_before_reading_data(tmp_path):
    """Each was a traceback (torch's device parser, torch.jit.load's advice about map_location)."""
    common = ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "s.npz")]
    _refused(fid.main, [*common, "--device", "cdua"], "--device 'cdua' is not a device: cpu, cuda or cuda:N")
    _refused(fid.main, [*common, "--device", "meta"], "--device meta: the statistics are computed on cpu or cuda")
    if not torch.cuda.is_available():
        _refused(fid.main, [*common, "--device", "cuda"], "--device cuda: no CUDA device here; use --device cpu")
    _refused(fid.main, [*common, "--inception", str(tmp_path / "no.pt")], f"--inception {tmp_path / 'no.pt'} does not")
    (tmp_path / "notes.txt").write_text("not a model")
    _refused(fid.main, [*common, "--device", "cpu", "--inception", str(tmp_path / "notes.txt")],
             f"{tmp_path / 'notes.txt'} is not a TorchScript feature extractor")  # fmt: skip


def test_fid_leaves_no_partial_file_when_the_statistics_cannot_be_saved(tmp_path):
    (tmp_path / "stats.npz").mkdir()
    with pytest.raises(OSError):
        fid.save_statistics(str(tmp_path / "stats.npz"), np.random.default_rng(0).normal(size=(8, 4)))
    assert os.listdir(tmp_path) == ["stats.npz"]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_kdd_protocol_refuses_fewer_than_one_split_and_keeps_protocol_json(tmp_path, value):
    (tmp_path / "protocol.json").write_text('{"old": 1}')
    _refused(kdd_protocol.main, ["--csv", "k.csv", "--out", str(tmp_path), "--splits", value],
             f"--splits: must be at least 1, got {value}")  # fmt: skip
    assert (tmp_path / "protocol.json").read_text() == '{"old": 1}'


@pytest.mark.parametrize("override", ["train.entropy_weight=2", "model.z_dim=4", "output_dir=elsewhere"])
def test_evaluate_refuses_an_override_the_checkpoint_fixes_before_loading(tmp_path, override):
    key = override.split("=")[0]
    _refused(evaluate.main, ["--run", str(tmp_path / "no-run"), "eval.seed=3", override], key, "eval.* and data.*")


@pytest.mark.parametrize("argv", [["eval.num_samples", "5"], ["eval"], ["eval.num_samples:5"]])
def test_evaluate_names_an_override_without_a_value_before_loading(tmp_path, argv):
    # "eval.num_samples 5" (a space for the "=") was "5: an evaluation takes only eval.* and data.*
    # overrides", and "eval" alone was told that it was not under eval.
    last = _refused(evaluate.main, ["--run", str(tmp_path / "no-run"), *argv],
                    f"override '{argv[0]}' must look like section.key=value")  # fmt: skip
    assert "eval.* and data.*" not in last


@pytest.mark.parametrize("seed", ["-3", "99999999999999999999999"])
def test_evaluate_checks_its_seed_with_the_configs_range_before_loading(tmp_path, seed):
    # A huge one was a traceback (Overflow when unpacking long long); -3 was taken, where meg-sample refuses it.
    _refused(evaluate.main, ["--run", str(tmp_path / "no-run"), "--seed", seed], f"--seed={seed} is out of range")


def test_evaluate_takes_eval_and_data_overrides(tmp_path):
    # Past the override check, the missing run is the error.
    last = _refused(evaluate.main, ["--run", str(tmp_path / "no-run"), "eval.seed=3", "data.url=elsewhere"], "no-run")
    assert "override" not in last


@pytest.mark.parametrize(
    "argv, says",
    [
        (["toy", "--out", "htp://bucket/toy"], ["argument --out: 'htp://bucket/toy': unknown scheme 'htp'"]),
        (
            ["arrays", "--x", "s3://b/x.npy::htp://y.npy", "--out", "OUT"],
            ["argument --x: 's3://b/x.npy::htp://y.npy'", "'htp'"],
        ),
        (["index", "--shards", "data/x-{000..003.tar", "--out", "OUT"], ["unbalanced braces", "{000000..000015}"]),
        (["toy", "--out", " "], ["--out is empty: give the folder"]),
    ],
    ids=["out", "input", "braces", "empty_out"],
)
def test_convert_names_a_url_it_cannot_open_before_any_work(tmp_path, argv, says):
    """Each was a traceback from fsspec (ValueError: Protocol not known) or braceexpand."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    _refused(convert.main, argv, *says)
    assert not (tmp_path / "out").exists()


def test_the_trainer_names_a_url_scheme_or_toy_data_set_it_does_not_know_before_any_work(tmp_path):
    from data_pipeline.config import check_url
    from trainer.config import ConfigError, load_config

    assert "unknown scheme 'htp'" in check_url("htp://example.com/data")
    assert check_url("s3://bucket/x-{000..003}.tar::pipe:cat y.tar") is None and check_url("data/x") is None
    with pytest.raises(
        ConfigError, match=r"data.toy='25gausians' is not valid; choose one of '' \(none\), 25gaussians,"
    ):
        load_config("toy_25gaussians", ["data.toy=25gausians"])
    # The trainer's wiring: a one-line error before the run folder is made.
    code = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", "data.url=htp://example.com/data",
         f"output_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert code.returncode == 2 and "error: data.url='htp://example.com/data': unknown scheme 'htp'" in code.stderr
    assert "Traceback" not in code.stderr and not (tmp_path / "run").exists()


def test_the_configs_toy_names_are_the_toy_data_sets():
    from data_pipeline.config import ToyName
    from data_pipeline.toy import TOY_SPECS

    assert set(ToyName.__args__) == {"", *TOY_SPECS}


def test_convert_refuses_a_file_that_is_not_numpy_without_advising_to_unpickle_it(tmp_path):
    (tmp_path / "notes.npy").write_text("x,y\n1,2\n")  # numpy took it for a pickle and said to load it unsafely
    last = _refused(convert.main, ["arrays", "--x", str(tmp_path / "notes.npy"), "--out", str(tmp_path / "o")],
                    f"{tmp_path / 'notes.npy'} is not a .npy or .npz file of numbers")  # fmt: skip
    assert "pickle" not in last and "unsafe" not in last and not (tmp_path / "o").exists()


def test_convert_names_an_out_it_cannot_write_before_reading_the_input(tmp_path):
    # "Not a directory: ..." came from the first shard's write, after all the input was read.
    (tmp_path / "file").write_text("")
    missing_csv = str(tmp_path / "digits.csv")  # never read: the --out error comes first
    _refused(convert.main, ["mnist", "--csv", missing_csv, "--out", str(tmp_path / "file" / "o")],
             f"--out {tmp_path / 'file' / 'o'}: cannot write there ({tmp_path / 'file'} is not a folder)")  # fmt: skip


def test_output_paths_that_cannot_take_the_file_are_refused_before_any_work(tmp_path):
    # /proc takes no new file: the sampling (or a classifier's training) ran first, then
    # "No such file or directory: /proc/x.png.tmp-17294". Nothing below reads its --run or --data.
    run, data = str(tmp_path / "no-run"), str(tmp_path / "no-data")
    says = "cannot write there (/proc refuses new files"
    _refused(sample.main, ["--run", run, "--out", "/proc/meg-x.png"], "--out /proc/meg-x.png: " + says)
    _refused(sample.main, ["--run", run, "--npy", "/proc/meg-x.npy"], says)
    _refused(classifier.main, ["--data", data, "--out", "/proc/meg-c.pt"], says)
    _refused(fid.main, ["--data", data, "--out", "/proc/meg-f.npz"], says)
    _refused(convert.main, ["toy", "--out", "/proc/meg-d"], "--out /proc/meg-d: " + says)
    # A device or a pipe was replaced by a regular file (root may replace /dev/null).
    os.mkfifo(tmp_path / "pipe.npy")
    for path in ("/dev/null", str(tmp_path / "pipe.npy")):
        _refused(sample.main, ["--run", run, "--npy", path], f"--npy {path} is not a regular file")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


@pytest.mark.parametrize(
    "main, argv, says",
    [
        # A data set's manifest or shard was overwritten by statistics, weights or samples.
        (fid.main, ["--data", "{tmp}/d", "--out", "{tmp}/d/manifest.json"], "end the name in .npz"),
        (classifier.main, ["--data", "{tmp}/d", "--out", "{tmp}/d/manifest.json"], "end the name in .pt, .pth"),
        (sample.main, ["--run", "{tmp}/r", "--npy", "{tmp}/d/s-000000.tar"], ".tar is not a format it writes"),
    ],
)  # fmt: skip
def test_an_output_file_must_end_in_its_format(tmp_path, main, argv, says):
    _refused(main, [a.format(tmp=tmp_path) for a in argv], says)


@pytest.mark.parametrize("where", ["a file", "a checkpoints folder", "a data set", "a linked eval folder"])
def test_check_refuses_a_run_folder_the_run_would_refuse(tmp_path, where):
    # --check (which ./launch.sh --nproc N and --slurm run first) said "good" for all of these; the job
    # then failed on every rank, or after the queue wait.
    from trainer import main as trainer_main

    (tmp_path / "afile").write_text("notes")
    (tmp_path / "run" / "checkpoints" / "step_00000010").mkdir(parents=True)
    write_array_shards(str(tmp_path / "data"), "d", "train", np.zeros((8, 2), np.float32), np.zeros(8), 2)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "eval").symlink_to(tmp_path / "afile")
    output_dir, says = {
        "a file": (tmp_path / "afile", "is not a folder: choose another output_dir"),
        "a checkpoints folder": (tmp_path / "run" / "checkpoints", "it is a run's checkpoints/ folder"),
        "a data set": (tmp_path / "data", "holds a data set (manifest.json)"),
        "a linked eval folder": (tmp_path / "linked", "refusing a run folder whose files are links"),
    }[where]
    _refused(trainer_main.main, ["--config", "debug", f"output_dir={output_dir}", "--check"], says)
    code, err = _run(trainer_main.main, ["--config", "debug", f"output_dir={tmp_path / 'new'}", "--check"])
    assert code == 0 and not err, err
