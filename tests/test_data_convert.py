"""Converters: every source format on small data the tests make, then the real files when present."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import convert
from data_pipeline.cli import DataError
from data_pipeline.shards import read_manifest
from data_pipeline.sources import FASHION_MNIST_DIR, KDD_COLUMNS
from data_pipeline.stream import ShardStream, StreamPosition, decode_samples

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = REAL if REAL.exists() else Path("/work/shared/data")


def all_samples(url: str):
    m = read_manifest(url)
    s = ShardStream(m, 0, 1, 1, 0, shuffle_buffer=0)
    batches = list(s.epoch_batches(StreamPosition()))
    order = np.argsort([int(b["key"][0]) for b in batches])
    x = np.concatenate([decode_samples(batches[i]["x"], m.dtype).numpy() for i in order])  # what a model sees
    y = np.array([int(batches[i]["label"][0]) for i in order])
    return m, x, y


def write_idx(path: Path, array: np.ndarray, gz: bool) -> str:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    raw = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return str(path)


def digits(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    x, y = digits()
    images = write_idx(tmp_path / "t10k-images-idx3-ubyte", x, gz)
    labels = write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, gz)
    assert (
        convert.main(
            [
                "mnist",
                "--images",
                images,
                "--labels",
                labels,
                "--out",
                str(tmp_path / "o"),
                "--num-shards",
                "4",
            ]
        )
        == 0
    )
    m, xs, ys = all_samples(str(tmp_path / "o"))
    assert (m.name, m.split, m.sample_shape, m.dtype) == ("mnist", "test", [1, 28, 28], "uint8")
    assert [s.num_samples for s in m.shards] == [50] * 4 and m.class_counts == {str(d): 20 for d in range(10)}
    assert m.source_checksum.count("sha256:") == 2
    np.testing.assert_allclose(xs[:, 0], x / 127.5 - 1, atol=1e-6)
    assert (ys == y).all()


def test_mnist_csv_and_bad_idx(tmp_path):
    x, y = digits(30)
    table = np.concatenate([x.reshape(30, -1), y[:, None]], axis=1)
    csv = tmp_path / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in table).encode()))
    convert.convert_mnist(str(tmp_path / "o"), csvs=(str(csv),), num_shards=3)
    m, xs, ys = all_samples(str(tmp_path / "o"))
    assert m.num_samples == 30 and (ys == y).all()
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03" + bytes(20))
    assert (
        convert.main(
            [
                "mnist",
                "--images",
                str(tmp_path / "bad"),
                "--labels",
                str(tmp_path / "bad"),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )


def test_stacked_mnist_labels_are_mode_ids(tmp_path):
    x, y = digits()
    images, labels = write_idx(tmp_path / "i", x, True), write_idx(tmp_path / "l", y, True)
    m = convert.convert_stacked_mnist(
        str(tmp_path / "o"), images, labels, n_stack=3, num_samples=300, seed=5, num_shards=3
    )
    again = convert.stack_digits(x[:, None], y.astype(np.int64), 3, 300, seed=5)
    _, xs, ys = all_samples(str(tmp_path / "o"))
    assert m.sample_shape == [3, 28, 28] and (ys == again[1]).all() and ys.max() < 1000
    for i in range(5):  # each channel is a source digit whose label is that decimal digit of the mode
        for c, digit in enumerate(f"{ys[i]:03d}"):
            matches = np.flatnonzero((x == again[0][i, c]).all(axis=(1, 2)))
            assert int(digit) in y[matches]
    assert m.preprocessing["num_modes"] == 1000


def test_cifar10_python_archive_layout(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, n in [("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)]:
            batch = {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"labels": [i % 10 for i in range(n)],
            }
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            if name == "data_batch_1":
                first = batch[b"data"][0].reshape(3, 32, 32)
    ms = convert.convert_cifar10(str(tmp_path / "o"), str(archive), num_shards=2)
    assert ms["train"].num_samples == 40 and ms["test"].num_samples == 10 and ms["train"].sample_shape == [3, 32, 32]
    _, xs, _ = all_samples(str(tmp_path / "o" / "train"))
    np.testing.assert_allclose(xs[0], first / 127.5 - 1, atol=1e-6)


def fake_kdd(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        row = [str(rng.integers(0, 100)) for _ in KDD_COLUMNS]
        row[1], row[2], row[3] = (
            rng.choice(["tcp", "udp", "icmp"]),
            rng.choice(["http", "smtp"]),
            "SF",
        )
        lines.append(",".join(row) + "," + ("normal." if i % 3 == 0 else rng.choice(["smurf.", "neptune."])))
    return "\n".join(lines) + "\n"


def test_kdd_protocol_and_min_max_on_train_only(tmp_path):
    path = tmp_path / "kdd.gz"
    path.write_bytes(gzip.compress(fake_kdd(1000).encode()))
    ms = convert.convert_kdd(str(tmp_path / "o"), str(path), seed=1, num_shards=2)
    train, test = ms["train"], ms["test"]
    pre = train.preprocessing
    assert pre["records_total"] == 1000 and pre["records_first_half"] == 500
    assert train.class_counts == {"0": pre["train_records"]}  # attacks only
    assert test.class_counts["1"] == pre["test_anomalies"] and abs(pre["test_anomaly_share"] - 0.2) < 0.01
    d = len(pre["features"])
    assert d == 38 + 3 + 2 + 1 and train.sample_shape == [d]
    _, xtr, _ = all_samples(str(tmp_path / "o" / "train"))
    assert xtr.min() == 0.0 and xtr.max() == 1.0  # scaled on exactly these records
    lo, hi = np.array(pre["minmax"]["min"]), np.array(pre["minmax"]["max"])
    assert (lo <= hi).all() and len(lo) == d


def test_mnist_anomaly_split(tmp_path):
    x, y = digits(500)
    images, labels = write_idx(tmp_path / "i", x, False), write_idx(tmp_path / "l", y, False)
    ms = convert.convert_mnist_anomaly(str(tmp_path / "o"), 4, images, labels, num_shards=2)
    assert "4" not in ms["train"].class_counts
    assert ms["train"].num_samples == 360 and ms["test"].num_samples == 90 + 50 and ms["test"].class_counts["4"] == 50
    _, _, ytr = all_samples(str(tmp_path / "o" / "train"))
    assert (ytr != 4).all()


def test_image_folder_and_arrays(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", ".ipynb_checkpoints"):  # a hidden folder is no class (it became class 0)
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    m = convert.convert_images(str(tmp_path / "o"), str(tmp_path / "imgs"), num_shards=2)
    assert m.sample_shape == [3, 12, 12] and m.class_counts == {"0": 3, "1": 3}
    assert m.preprocessing["classes"] == ["cat", "dog"] and m.preprocessing["files_left_out"] == 0
    (tmp_path / "imgs" / "emu").mkdir()  # a class no image has: refused, not a label that never occurs
    err = _convert_error(["images", "--folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "o2")])
    assert f"{tmp_path / 'imgs'}/emu: a class folder with no images" in err and not (tmp_path / "o2").exists()
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(10, 4)), y=np.arange(10))
    m = convert.convert_arrays(str(tmp_path / "p"), str(tmp_path / "a.npz"), num_shards=2)
    assert m.dtype == "float32" and m.num_samples == 10 and m.class_counts["9"] == 1


@pytest.mark.parametrize("values, warned", [(np.array([0, 1], np.uint8), True), (np.array([0, 255], np.uint8), False),
                                            (np.array([0.0, 1.0], np.float32), False)])  # fmt: skip
def test_binary_uint8_arrays_are_warned_of_the_image_scaling(tmp_path, capsys, values, warned):
    # Binarised digits (uint8 0/1) became -1 and -0.992 for the model, without a word.
    np.save(tmp_path / "x.npy", np.resize(values, (8, 4)))
    assert convert.main(["arrays", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")]) == 0
    assert ("holds uint8 values 0 and 1 only" in capsys.readouterr().err) == warned


@pytest.mark.parametrize("source", ["images", "arrays"])
def test_sorted_classes_are_shuffled_into_every_shard_each_sample_with_its_label(tmp_path, source):
    # A folder is read class by class: each shard held one class, and batches held a few classes (one
    # class in 11% of them on 2 ranks x 2 workers), however the stream shuffled.
    from PIL import Image

    x = np.repeat(np.arange(4, dtype=np.uint8) * 60, 25)[:, None, None, None] + np.zeros((1, 1, 6, 6), np.uint8)
    x[:, 0, 0, 0] = np.tile(np.arange(25, dtype=np.uint8), 4)  # each image its own
    y = np.repeat(np.arange(4), 25)  # sorted by class, as a folder is read
    if source == "images":
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(tmp_path / "imgs" / f"c{label}" / f"{i:03d}.png")
        m = convert.convert_images(str(tmp_path / "o"), str(tmp_path / "imgs"), mode="L", num_shards=4)
    else:
        np.savez(tmp_path / "a.npz", x=x, y=y)
        m = convert.convert_arrays(str(tmp_path / "o"), str(tmp_path / "a.npz"), num_shards=4)
    assert m.preprocessing["order"] == "shuffled: numpy default_rng(0).permutation"
    _, got, labels = all_samples(str(tmp_path / "o"))
    raw = np.rint((got + 1) * 127.5).astype(np.uint8)  # what the model sees, back in uint8
    assert sorted(map(bytes, raw)) == sorted(map(bytes, x)) and (raw[:, 0, 1, 1] // 60 == labels).all()
    per_shard = [set(labels[i : i + 25]) for i in range(0, 100, 25)]  # 4 shards of 25, in key order
    assert all(len(classes) >= 3 for classes in per_shard), per_shard


# -- the real files (../shared/data, the Debian Fashion-MNIST package) -----------------------


def need(*paths: Path | str) -> None:
    for p in paths:
        if not os.path.exists(p):
            pytest.skip(f"real data file {p} is absent (see shared/data/README.md)")


MNIST_I, MNIST_L = (
    REAL / "mnist" / "t10k-images-idx3-ubyte.gz",
    REAL / "mnist" / "t10k-labels-idx1-ubyte.gz",
)


@pytest.mark.slow
def test_real_kdd(tmp_path):
    src = REAL / "kddcup99" / "kddcup.data_10_percent.gz"
    need(src)
    ms = convert.convert_kdd(str(tmp_path / "kdd"), str(src), seed=0)
    pre = ms["train"].preprocessing
    assert pre["records_total"] == 494_021 and pre["source_label_counts"]["normal."] == 97_278
    assert ms["train"].source_checksum == "sha256:8045aca0d84e70e622d1148d7df782496f6333bf6eb979a1b0837c42a9fd9561"
    assert ms["train"].class_counts == {"0": pre["train_records"]}
    assert ms["test"].class_counts["1"] == pre["test_anomalies"] and 0.19 < pre["test_anomaly_share"] <= 0.2
    assert read_manifest(str(tmp_path / "kdd" / "test")).num_samples == pre["test_inliers"] + pre["test_anomalies"]


def test_real_mnist_and_stacked(tmp_path):
    need(MNIST_I, MNIST_L)
    m = convert.convert_mnist(str(tmp_path / "m"), str(MNIST_I), str(MNIST_L))
    assert m.num_samples == 10_000 and sum(m.class_counts.values()) == 10_000 and m.class_counts["1"] == 1135
    s = convert.convert_stacked_mnist(str(tmp_path / "s"), str(MNIST_I), str(MNIST_L), num_samples=26_000)
    assert s.num_samples == 26_000 and len(s.class_counts) > 990 and s.sample_shape == [3, 28, 28]
    a = convert.convert_mnist_anomaly(str(tmp_path / "a"), 1, str(MNIST_I), str(MNIST_L))
    assert a["test"].class_counts["1"] == 1135 and a["train"].num_samples == round(0.8 * (10_000 - 1135))


@pytest.mark.slow
def test_real_fashion_mnist(tmp_path):
    need(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    ms = convert.convert_fashion_mnist(str(tmp_path / "f"))
    assert ms["train"].num_samples == 60_000 and ms["test"].num_samples == 10_000
    assert set(ms["train"].class_counts.values()) == {6000}
    manifest = json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 60_000 and all(s["num_bytes"] > 0 for s in manifest["shards"])


# -- converters check their domain -------------------------------------------------------------------


def _convert_error(argv: list[str]) -> str:
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert convert.main(argv) == 2
    assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
    return err.getvalue()


@pytest.mark.parametrize("bad", [10, 255])
def test_mnist_labels_outside_0_to_9_are_refused(tmp_path, bad):
    x, y = digits(20)
    y[7] = bad
    images, labels = write_idx(tmp_path / "i", x, True), write_idx(tmp_path / "l", y, True)
    err = _convert_error(["mnist", "--images", images, "--labels", labels, "--out", str(tmp_path / "o")])
    assert f"{labels}: labels must be 0..9, found {bad} at record 7" in err


@pytest.mark.parametrize("shape", [(14, 56), (7, 112)])
def test_idx_images_that_are_not_28x28_are_refused(tmp_path, shape):
    x, y = digits(20)
    images = write_idx(tmp_path / "i", x.reshape(20, *shape), False)
    labels = write_idx(tmp_path / "l", y, False)
    for tool in ("mnist", "stackedmnist"):
        err = _convert_error([tool, "--images", images, "--labels", labels, "--out", str(tmp_path / tool)])
        assert f"{images}: images of {shape[0]}x{shape[1]}; the digit sets hold 28x28 images" in err


def test_a_non_finite_kdd_cell_is_refused_naming_its_line(tmp_path):
    lines = fake_kdd(30).splitlines()
    cells = lines[11].split(",")
    cells[4] = "1e400"  # src_bytes: inf as a float
    lines[11] = ",".join(cells)
    path = tmp_path / "kdd.csv"
    path.write_text("\n".join(lines) + "\n")
    err = _convert_error(["kdd", "--csv", str(path), "--out", str(tmp_path / "o")])
    assert "line 12, column 5 (src_bytes) is inf" in err and str(path) in err


@pytest.mark.parametrize("keep, says", [("attacks", "no normal. records"), ("normal", "only normal. records")])
def test_a_kdd_file_with_one_class_is_refused(tmp_path, keep, says):
    lines = [r for r in fake_kdd(60).splitlines() if r.endswith("normal.") == (keep == "normal")]
    path = tmp_path / "kdd.csv"
    path.write_text("\n".join(lines) + "\n")
    err = _convert_error(["kdd", "--csv", str(path), "--out", str(tmp_path / "o")])
    assert says in err and not (tmp_path / "o").exists()


def test_a_kdd_row_with_a_field_too_many_is_refused_naming_its_line(tmp_path):
    # loadtxt read the columns it was given: the row was read shifted, its label another column's (exit 0).
    lines = fake_kdd(30).splitlines()
    cells = lines[8].split(",")
    lines[8] = ",".join([*cells[:4], "SF", *cells[4:]])
    path = tmp_path / "kdd.csv"
    path.write_text("\n".join(lines) + "\n")
    err = _convert_error(["kdd", "--csv", str(path), "--out", str(tmp_path / "o")])
    assert f"{path}: line 9 has {len(KDD_COLUMNS) + 2} fields, expected {len(KDD_COLUMNS) + 1}" in err
    assert not (tmp_path / "o").exists()


def test_a_two_split_source_whose_second_split_is_bad_writes_neither(tmp_path):
    # The train split was written, then the test split failed: a data set half made, refusing a rerun.
    x, y = digits(30)
    folder = tmp_path / "fm"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", x, True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y, True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x[:10], True)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    _convert_error(["fashion-mnist", "--dir", str(folder), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # mnist-anomaly: a held-out digit the digits do not hold (every test score undefined), and an empty train split.
    images, labels = write_idx(tmp_path / "i", x, True), write_idx(tmp_path / "l", y % 3, True)
    common = ["mnist-anomaly", "--images", images, "--labels", labels, "--out", str(tmp_path / "a")]
    assert "the digits hold no 7, the held-out digit" in _convert_error([*common, "--digit", "7"])
    only = write_idx(tmp_path / "l3", np.full(30, 3, np.uint8), True)
    err = _convert_error(
        ["mnist-anomaly", "--images", images, "--labels", only, "--digit", "3", "--out", str(tmp_path / "a")]
    )
    assert "its train split would be empty" in err and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "labels, says",
    [
        (np.linspace(0, 2, 10), "labels must be whole numbers; some are fractional"),  # written as 0, 0, 0, ..., 2
        (np.full(10, np.nan), "labels must be whole numbers; some are fractional, NaN"),  # -9223372036854775808
        (np.array(["cat"] * 10), "labels must be whole numbers, got dtype <U3"),  # a traceback
    ],
)
def test_arrays_refuses_labels_that_are_not_whole_numbers_naming_their_file(tmp_path, labels, says):
    np.save(tmp_path / "x.npy", np.zeros((10, 2), np.float32))
    np.save(tmp_path / "y.npy", labels)
    err = _convert_error(
        ["arrays", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o")]
    )
    assert f"{tmp_path / 'y.npy'}: {says}" in err and not (tmp_path / "o").exists()


def test_arrays_refuses_non_finite_samples_and_a_labels_key_it_lacks(tmp_path):
    x = np.zeros((10, 2), np.float32)
    x[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    err = _convert_error(["arrays", "--x", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o")])
    assert "some sample values are NaN or infinite" in err
    np.savez(tmp_path / "xy.npz", x=np.zeros((10, 2), np.float32), labels=np.arange(10))
    err = _convert_error(["arrays", "--x", str(tmp_path / "xy.npz"), "--y-key", "lables", "--out", str(tmp_path / "o")])
    assert "has arrays ['labels', 'x'], not 'lables' (use --y-key)" in err  # every label was 0
    assert not (tmp_path / "o").exists()
    # Without --y-key an .npz's "y" is taken where there is one, and none is no labels.
    assert convert.main(["arrays", "--x", str(tmp_path / "xy.npz"), "--out", str(tmp_path / "o")]) == 0


def test_images_left_out_of_an_image_folder_are_counted_and_named(tmp_path, capsys):
    from PIL import Image

    picture = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "imgs" / "cat" / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("cat/1.png", "cat/2.png", "cat/.ipynb_checkpoints/1.png", "stray.png"):
        picture.save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "cat" / "3.heic").write_bytes(b"not read: PIL has no HEIC decoder")
    (tmp_path / "imgs" / "cat" / ".DS_Store").write_bytes(b"")
    assert convert.main(["images", "--folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")]) == 0
    # The hidden files are no one's samples; the HEIC and the image outside the classes were silently fewer.
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {tmp_path / 'imgs'}: left out 2 files, as only images (.png")
    assert warning.rstrip().endswith("are read: stray.png, cat/3.heic") and warning.count("\n") == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["preprocessing"]["files_left_out"] == 2


def test_arrays_refuses_a_labels_npz_array_of_objects_without_unpickling_it(tmp_path):
    # np.load reads an .npz lazily: its arrays load at the key's lookup, which for --y was outside the
    # error handling (a raw ValueError traceback). Nothing is unpickled either way.
    np.save(tmp_path / "x.npy", np.zeros((10, 2), np.float32))
    np.savez(tmp_path / "y.npz", y=np.array([{"label": 1}] * 10, dtype=object))
    err = _convert_error(
        ["arrays", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npz"), "--out", str(tmp_path / "o")]
    )
    assert f"{tmp_path / 'y.npz'} is not a .npy or .npz file of numbers" in err and not (tmp_path / "o").exists()


def test_arrays_y_key_names_the_array_of_the_labels_file_when_there_is_one(tmp_path):
    # With --y, --y-key is that file's key: looked for in the --x .npz too, it was refused there.
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 2), np.float32))
    np.savez(tmp_path / "y.npz", lab=np.arange(10) % 2)
    argv = ["arrays", "--x", str(tmp_path / "x.npz"), "--y", str(tmp_path / "y.npz"), "--y-key", "lab"]
    assert convert.main([*argv, "--out", str(tmp_path / "o")]) == 0
    err = _convert_error([*argv[:-1], "labels", "--out", str(tmp_path / "p")])
    assert f"{tmp_path / 'y.npz'} has arrays ['lab'], not 'labels' (use --y-key)" in err


def test_cifar10_labels_outside_0_to_9_or_a_missing_split_are_refused(tmp_path):
    def archive(name, batches):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for batch_name, labels in batches:
                raw = pickle.dumps({b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": labels})
                info = tarfile.TarInfo(f"cifar-10-batches-py/{batch_name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return str(path)

    bad = archive("bad.tar.gz", [("data_batch_1", [42] * 4), ("test_batch", [1] * 4)])
    assert "data_batch_1 holds 4 images and 4 labels, not all 0..9" in _convert_error(
        ["cifar10", "--archive", bad, "--out", str(tmp_path / "o")]
    )
    train_only = archive("train.tar.gz", [("data_batch_1", [1] * 4)])
    assert "no test_batch inside" in _convert_error(["cifar10", "--archive", train_only, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_stacked_mnist_n_stack_is_bounded_and_index_keeps_an_existing_manifest(tmp_path):
    # 19 digits overflowed the int64 mode ids into negative labels; 5000 wrote a shard, then a traceback.
    images, labels = write_idx(tmp_path / "i", digits(20)[0], True), write_idx(tmp_path / "l", digits(20)[1], True)
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        convert.main(
            ["stackedmnist", "--images", images, "--labels", labels, "--n-stack", "19", "--out", str(tmp_path / "s")]
        )
    assert "argument --n-stack: must be at most 18, got 19" in err.getvalue()
    # index over a folder that holds a data set: its manifest was replaced, its shards orphaned.
    assert (
        convert.main(
            ["mnist", "--images", images, "--labels", labels, "--num-shards", "2", "--out", str(tmp_path / "m")]
        )
        == 0
    )
    before = (tmp_path / "m" / "manifest.json").read_text()
    pattern = str(tmp_path / "m" / "mnist-train-{000000..000001}.tar")
    assert "already holds a manifest.json" in _convert_error(
        ["index", "--shards", pattern, "--out", str(tmp_path / "m")]
    )
    assert (tmp_path / "m" / "manifest.json").read_text() == before


def test_an_mnist_csv_with_the_label_first_is_refused_not_read_as_all_zeros(tmp_path):
    # pjreddie's layout (label, 784 pixels): the always-0 corner pixel was read as every label (exit 0).
    x, y = digits(30)
    x[:, 0, :] = x[:, -1, :] = 0  # MNIST's blank border rows
    table = np.concatenate([y[:, None], x.reshape(30, -1)], axis=1)
    csv = tmp_path / "label_first.csv"
    csv.write_text("\n".join(",".join(map(str, r)) for r in table) + "\n")
    err = _convert_error(["mnist", "--csv", str(csv), "--out", str(tmp_path / "o")])
    assert f"{csv}: the label looks to be the first column" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "spoil, says",
    [
        (lambda rows: "", "holds no records (an empty file)"),
        (lambda rows: rows.replace(",tcp,", ",,", 1), "has an empty field 2 (protocol_type)"),
        (lambda rows: rows.replace("normal.", "", 1), "has an empty field 42 (label)"),
    ],
)
def test_an_empty_kdd_file_or_field_is_named(tmp_path, spoil, says):
    # An empty file leaked numpy's "input contained no data" warning, then said "no normal. records";
    # an empty protocol_type was read as a category of its own.
    path = tmp_path / "kdd.gz"
    path.write_bytes(gzip.compress(spoil(fake_kdd(200)).encode()))
    with pytest.raises(DataError, match=re.escape(says)):
        convert.convert_kdd(str(tmp_path / "o"), str(path), seed=1, num_shards=2)


def test_a_held_out_digit_other_than_the_datas_is_refused_before_training(tmp_path):
    # eval.mnist_anomaly.digit=4 on data written without 1s trained on 4s and scored them as the anomaly.
    from trainer.config import ConfigError, load_config
    from trainer.evaluation import check_samples

    x, y = digits(500)
    images, labels = write_idx(tmp_path / "i", x, False), write_idx(tmp_path / "l", y, False)
    convert.convert_mnist_anomaly(str(tmp_path / "a1"), 1, images, labels, num_shards=2)
    data = [f"data.url={tmp_path / 'a1' / 'train'}", f"eval.mnist_anomaly.test_data={tmp_path / 'a1' / 'test'}"]
    check_samples(load_config("mnist_anomaly_mlp", [*data, "eval.mnist_anomaly.digit=1"]), [1, 28, 28])
    with pytest.raises(ConfigError) as refused:
        check_samples(load_config("mnist_anomaly_mlp", [*data, "eval.mnist_anomaly.digit=4"]), [1, 28, 28])
    assert str(refused.value).startswith(
        f"eval.mnist_anomaly.digit=4, but data.url={tmp_path / 'a1' / 'train'} was written with digit 1 held out"
    )
