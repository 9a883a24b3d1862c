"""Mistakes the tools used to take silently or answer with a traceback, each refused in one line (exit 2)
before any work where it can be told up front: too few images for FID statistics, one data set given
twice or missing digits for the classifier, an unusable --out for `convert index`, sample counts no
machine holds."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import convert
from data_pipeline.cli import DataError, run_tool
from data_pipeline.shards import write_array_shards
from tests.test_cli_flags import _refused, _run
from trainer import classifier, fid


def _digits(folder, labels) -> str:
    labels = np.asarray(labels, np.int64)
    write_array_shards(str(folder), "digits", "test", np.zeros((len(labels), 1, 28, 28), np.uint8), labels, 2)
    return str(folder)


@pytest.fixture
def no_reading(monkeypatch):
    """Fails a test whose tool reads the samples (or indexes shards) before refusing."""
    from data_pipeline import stream

    monkeypatch.setattr(stream, "read_split", lambda *a, **k: pytest.fail("the data was read before the refusal"))
    monkeypatch.setattr(stream, "manifest_from_urls", lambda *a, **k: pytest.fail("the shards were read first"))


# --- meg-fid: a covariance needs two images ---------------------------------------------------------


def test_fid_refuses_num_1_at_parsing_and_keeps_0_for_all(tmp_path):
    # --num 1 wrote an all-NaN covariance and said "wrote statistics of 1 images".
    missing = str(tmp_path / "none")
    _refused(fid.main, ["--data", missing, "--out", str(tmp_path / "s.npz"), "--num", "1"],
             "--num: must be 0 (all the images) or at least 2")  # fmt: skip
    for num in ("0", "2"):  # accepted: the missing data is what is named
        _refused(fid.main, ["--data", missing, "--out", str(tmp_path / "s.npz"), "--num", num, "--device", "cpu",
                            "--inception", _tiny_extractor(tmp_path)], f"no manifest at {missing}")  # fmt: skip


def _tiny_extractor(tmp_path) -> str:
    """A TorchScript feature extractor of 4 features, in place of the 2048 of Inception's (seconds, not minutes)."""
    path = tmp_path / "tiny.pt"
    if not path.exists():
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 1)), str(path))
    return str(path)


def test_fid_refuses_a_data_set_of_one_image_before_computing_features(tmp_path, no_reading):
    data = _digits(tmp_path / "one", [7])
    out = tmp_path / "s.npz"
    _refused(fid.main, ["--data", data, "--out", str(out), "--device", "cpu", "--inception", _tiny_extractor(tmp_path)],
             f"--data {data} holds 1 image(s), and a covariance needs at least 2")  # fmt: skip
    assert not out.exists()


def test_fid_statistics_that_are_not_finite_are_not_written(tmp_path):
    path = str(tmp_path / "s.npz")
    with pytest.raises(DataError, match="FID statistics need at least 2 images"):
        fid.save_statistics(path, np.ones((1, 4)))
    features = np.random.default_rng(0).normal(size=(8, 4))
    features[3, 1] = np.nan  # a feature extractor of the user's (--inception) gone wrong
    with pytest.raises(DataError, match=f"not finite .*nothing was written to {path}"):
        fid.save_statistics(path, features)
    assert os.listdir(tmp_path) == []


def test_fid_statistics_that_are_not_finite_are_refused_when_loaded(tmp_path):
    # What the old --num 1 wrote: every evaluation against it died in numpy's LinAlgError.
    path = str(tmp_path / "one.npz")
    np.savez(path, mu=np.zeros(4), cov=np.full((4, 4), np.nan), features=np.zeros((1, 4), np.float32), num=1)
    for features in (True, False):
        with pytest.raises(DataError, match=f"{path} holds statistics that are not finite .*python -m trainer.fid"):
            fid.load_statistics(path, features=features)


# --- meg-classifier: each data set once, every digit --------------------------------------------------


def test_classifier_takes_a_folder_and_its_manifest_for_one_data_set(tmp_path):
    data = str(tmp_path / "d")
    for twice in ([data, data + "/manifest.json"], [data + "/manifest.json", str(tmp_path / "." / "d") + "/"]):
        argv = [arg for url in twice for arg in ("--data", url)]
        _refused(classifier.main, [*argv, "--out", str(tmp_path / "c.pt")],
                 f"--data {twice[0]} and --data {twice[1]} are one data set: give each once")  # fmt: skip


def test_classifier_refuses_data_missing_digits_from_the_manifest_before_reading_it(tmp_path, no_reading):
    # The train split of `convert mnist-anomaly --digit 3` holds no 3: the classifier never predicted one.
    no_threes = _digits(tmp_path / "no3", [d for d in np.arange(300) % 10 if d != 3])
    out = tmp_path / "c.pt"
    _refused(classifier.main, ["--data", no_threes, "--out", str(out)],
             f"--data {no_threes} holds no 3: the classifier would never predict it")  # fmt: skip
    few = _digits(tmp_path / "few", np.arange(200) % 3)  # 0, 1, 2: no 3 either
    _refused(classifier.main, ["--data", no_threes, "--data", few, "--out", str(out)], "the 2 --data sets hold no 3:")
    assert not out.exists()


def test_classifier_refuses_missing_digits_without_recorded_counts_after_reading(tmp_path):
    no_threes = _digits(tmp_path / "no3", [d for d in np.arange(300) % 10 if d != 3])
    manifest = tmp_path / "no3" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["class_counts"] = {}  # a manifest that records none: the labels read tell
    manifest.write_text(json.dumps(raw))
    out = tmp_path / "c.pt"
    _refused(classifier.main, ["--data", no_threes, "--out", str(out), "--epochs", "1"], "holds no 3")
    assert not out.exists()


def test_classifier_digit_check_names_what_is_wrong():
    classifier.check_digits({str(d) for d in range(10)}, ["a", "b"])  # every digit, across the sets
    with pytest.raises(DataError, match="the 2 --data sets hold no 0, 9: the classifier would never predict them"):
        classifier.check_digits({str(d) for d in range(1, 9)}, ["a", "b"])
    with pytest.raises(DataError, match="needs digits labelled 0..9; --data a holds labels -1, 10"):
        classifier.check_digits({str(d) for d in range(-1, 11)}, ["a"])


# --- meg-convert index: --out checked before the shards are read ------------------------------------


def test_convert_index_refuses_an_unusable_out_before_reading_the_shards(tmp_path, no_reading):
    _digits(tmp_path / "shards", np.arange(20) % 10)
    shards = str(tmp_path / "shards" / "digits-test-{000000..000001}.tar")
    (tmp_path / "afile").write_text("")
    # It was "error: File exists: ..." (no fix) and "No such file or directory: /proc/xx", after the reading.
    _refused(convert.main, ["index", "--shards", shards, "--out", str(tmp_path / "afile")],
             f"--out {tmp_path / 'afile'} is a file: give a folder")  # fmt: skip
    _refused(convert.main, ["index", "--shards", shards, "--out", str(tmp_path / "afile" / "d")],
             f"cannot write there ({tmp_path / 'afile'} is not a folder)")  # fmt: skip
    if os.path.isdir("/proc"):
        _refused(convert.main, ["index", "--shards", shards, "--out", "/proc/meg-index"],
                 "cannot write there (/proc refuses new files")  # fmt: skip


def test_convert_index_still_writes_its_manifest_beside_the_shards(tmp_path):
    _digits(tmp_path / "shards", np.arange(20) % 10)
    os.remove(tmp_path / "shards" / "manifest.json")
    shards = str(tmp_path / "shards" / "digits-test-{000000..000001}.tar")
    assert _run(convert.main, ["index", "--shards", shards, "--out", str(tmp_path / "shards")])[0] == 0
    assert (tmp_path / "shards" / "manifest.json").exists()


# --- meg-convert toy / stackedmnist: counts bounded at parsing, MemoryError one line ----------------


@pytest.mark.parametrize(
    "argv, says",
    [
        (["toy", "--num-samples", "100000000000"], "--num-samples: must be at most 10000000"),
        (["stackedmnist", "--num-samples", "100000000000"], "--num-samples: must be at most 3000000"),
        (["stackedmnist", "--num-samples", "2000000"], "lower --num-samples or --n-stack"),
        (["stackedmnist", "--num-samples", "200000", "--n-stack", "18"], "200,000 samples of 18 digits are more"),
    ],
)
def test_convert_bounds_the_sample_count_at_parsing(tmp_path, argv, says):
    out = tmp_path / "d"
    _refused(convert.main, [*argv, "--out", str(out)], says)
    assert not out.exists()


def test_convert_accepts_the_papers_counts(tmp_path, monkeypatch):
    parsed = []
    monkeypatch.setattr(convert, "_convert", lambda args: parsed.append(args) or 0)
    assert _run(convert.main, ["toy", "--num-samples", "10000000", "--out", str(tmp_path / "t")])[0] == 0
    assert _run(convert.main, ["stackedmnist", "--num-samples", "1000000", "--out", str(tmp_path / "s")])[0] == 0
    assert [args.num_samples for args in parsed] == [10_000_000, 1_000_000]


def test_running_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, monkeypatch):
    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 745. GiB for an array with shape (100000000000,) and data type int64")

    monkeypatch.setattr(convert, "sample_toy", too_big)
    last = _refused(
        convert.main, ["toy", "--out", str(tmp_path / "d")], "error: out of memory (Unable to allocate 745."
    )
    assert last.endswith(": lower --num-samples")
    monkeypatch.setattr(convert, "read_digits", too_big)  # any other source: the generic advice
    last = _refused(convert.main, ["mnist", "--csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m")])
    assert last.endswith(": convert fewer or smaller files, or run where more memory is free"), last
    with pytest.raises(MemoryError):
        run_tool(too_big, debug=True, memory_advice="lower --num-samples")
    # A tool that cannot say which size to lower (the trainer: its batch, its buffers) keeps the traceback,
    # and its exit status 1 (meg-kdd-protocol reads 2 as settings refused, 1 as a run to resume).
    with pytest.raises(MemoryError):
        run_tool(too_big, debug=False)


def test_ctrl_c_in_a_tool_is_one_line_and_the_shells_status():
    # A KeyboardInterrupt traceback (meg-fid's Inception features, a conversion) read as a crash.
    def interrupted():
        raise KeyboardInterrupt

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_tool(interrupted, debug=False) == 130
    assert err.getvalue() == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        run_tool(interrupted, debug=True)


def test_the_toy_data_a_run_writes_is_bounded_as_the_converters(tmp_path):
    # 2^30 points were allowed: about 40 GB in memory. A saved run's configuration with more still loads.
    from data_pipeline.config import DataConfig
    from data_pipeline.dataset import write_toy_data

    cfg = DataConfig(url=str(tmp_path / "toy"), toy="25gaussians", toy_num_samples=10_000_001)
    with pytest.raises(DataError, match=r"^data.toy_num_samples=10000001 is more than the 10,000,000 points a toy"):
        write_toy_data(cfg, seed=0)
    assert not (tmp_path / "toy").exists()


@pytest.mark.parametrize(
    "main, argv, says",
    [
        (fid.main, [], "--device DEVICE where the Inception network runs (default: "),
        (classifier.main, [], "passes over the data (default: 8)"),
        (convert.main, ["toy"], "a multiple of ranks x workers (default: 8)"),
        (convert.main, ["mnist"], "a multiple of ranks x workers (default: 16)"),
    ],
)
def test_help_says_the_defaults_a_user_gets(capsys, main, argv, says):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert says in " ".join(capsys.readouterr().out.split()), says


def test_fashion_mnist_missing_from_its_default_folder_names_the_package_and_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "FASHION_MNIST_DIR", str(tmp_path / "none"))  # as on a machine without it
    _refused(
        convert.main,
        ["fashion-mnist", "--out", str(tmp_path / "f")],
        f"no Fashion-MNIST at {tmp_path / 'none'}",
        "install that package, or give --dir",
    )
    assert not (tmp_path / "f").exists()


def test_fid_names_an_inception_folder_as_a_folder(tmp_path):
    _refused(
        fid.main,
        ["--data", str(tmp_path), "--out", str(tmp_path / "s.npz"), "--inception", str(tmp_path)],
        f"--inception {tmp_path} is a folder: give a TorchScript file",
    )


# --- a missing test split: the command that writes it, not the run's own data's ------------------------


@pytest.mark.parametrize(
    "kind, source", [("kdd", "convert kdd"), ("mnist_anomaly", "convert mnist-anomaly")]
)  # fmt: skip
def test_a_missing_test_split_names_the_converter_of_its_kind(tmp_path, kind, source):
    # evaluate eval.kind=kdd on a fashion_mnist run said "it is written with the training data by:
    # python -m data_pipeline.convert fashion-mnist ...", which writes no KDD records.
    from trainer.config import ConfigError, load_config
    from trainer.evaluation import check_requirements

    missing = str(tmp_path / "none")
    cfg = load_config("fashion_mnist", [f"eval.kind={kind}", f"eval.{kind}.test_data={missing}",
                                        "eval.mnist_anomaly.digit=1"])  # fmt: skip
    with pytest.raises(ConfigError, match=f"test_data={missing} does not exist") as refusal:
        check_requirements(cfg)
    assert source in str(refusal.value) and "fashion-mnist" not in str(refusal.value)
    own = load_config("kdd99" if kind == "kdd" else "mnist_anomaly", [f"eval.{kind}.test_data={missing}"])
    with pytest.raises(ConfigError, match="it is written with the training data by: python -m data_pipeline"):
        check_requirements(own)  # the preset's own data.prepare writes it


def test_fid_evaluation_of_one_sample_is_refused_before_any_work(tmp_path):
    # eval.kind=fid with eval.num_samples=1 passed --check; the run trained up to its first evaluation and
    # stopped there ("FID statistics need at least 2 images"), and meg-evaluate sampled first.
    from trainer.config import ConfigError, load_config
    from trainer.evaluation import check_requirements

    stats = str(tmp_path / "stats.npz")
    np.savez(stats, mu=np.zeros(4), cov=np.eye(4))
    for num in (1, 2):
        cfg = load_config("fashion_mnist_mlp", [f"eval.fid.reference={stats}", f"eval.num_samples={num}"])
        if num == 1:
            with pytest.raises(ConfigError, match="eval.kind=fid needs eval.num_samples of at least 2 .*got 1"):
                check_requirements(cfg)
        else:
            check_requirements(cfg)
