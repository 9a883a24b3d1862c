"""Every converter on hundreds of seeded mutations of a small valid input: each run converts or says
``error: ...`` (exit 2); none ends in a raw traceback. Mutations: flipped bytes, truncation,
insertions, deletions, zeroed runs, and for compressed inputs the same on the decompressed bytes."""

import contextlib
import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import convert

pytestmark = pytest.mark.slow
MUTATIONS = 300


def _idx(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _digits(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def _mutate(data: bytes, rng: np.random.Generator, text: bool = False) -> bytes:
    b = bytearray(data)
    op = rng.integers(0, 7 if text else 6)
    if op == 0 or len(b) < 2:  # flip a few bytes
        for _ in range(int(rng.integers(1, 9))):
            if b:
                b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif op == 1:  # truncate
        del b[int(rng.integers(0, len(b))) :]
    elif op == 2:  # insert random bytes
        at = int(rng.integers(0, len(b) + 1))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif op == 3:  # delete a run
        at = int(rng.integers(0, len(b)))
        del b[at : at + int(rng.integers(1, 256))]
    elif op == 4:  # zero or 0xff a run
        at = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 64))
        b[at : at + n] = bytes([0 if rng.random() < 0.5 else 255]) * len(b[at : at + n])
    elif op == 5:  # duplicate a run
        at = int(rng.integers(0, len(b)))
        b[at:at] = b[at : at + int(rng.integers(1, 512))]
    else:  # text: a number becomes huge, negative, fractional or a word
        tokens = bytes(b).split(b",")
        i = int(rng.integers(0, len(tokens)))
        tokens[i] = [b"99999", b"-7", b"1.5", b"nan", b"abc", b""][int(rng.integers(0, 6))]
        b = bytearray(b",".join(tokens))
    return bytes(b)


def _mutate_maybe_inside_gzip(data: bytes, rng: np.random.Generator, text: bool = False) -> bytes:
    if rng.random() < 0.5:
        return _mutate(data, rng, text)
    return gzip.compress(_mutate(gzip.decompress(data), rng, text), mtime=0)


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = convert.main(argv)  # an exception escaping here is the raw traceback a user would see
    return code, err.getvalue()


def _fuzz(tmp_path: Path, name: str, write_input, argv, mutate) -> None:
    """write_input(path_for, rng) writes the inputs (mutated by ``mutate``); argv(out) the arguments."""
    clean = tmp_path / f"{name}-clean"
    clean.mkdir()
    write_input(clean, lambda data, text=False: data)
    assert _run(argv(clean)) == (0, ""), f"{name}: the unmutated input must convert"
    rng = np.random.default_rng(0)
    outcomes = {0: 0, 2: 0}
    for i in range(MUTATIONS):
        case = tmp_path / f"{name}-{i}"
        case.mkdir()
        write_input(case, lambda data, text=False: mutate(data, rng, text))
        try:
            code, err = _run(argv(case))
        except Exception as e:  # noqa: BLE001 - the assertion below reports it with the mutation's number
            raise AssertionError(f"{name} mutation {i}: raw {type(e).__name__}: {e}") from e
        assert code in outcomes, (name, i, code, err)
        if code == 2:
            assert err.startswith("error: ") and "Traceback" not in err, (name, i, err)
        outcomes[code] += 1
    print(f"{name}: {outcomes[0]} converted, {outcomes[2]} clear errors, 0 tracebacks of {MUTATIONS}")
    assert outcomes[2] > 0  # the mutations did damage something


def _idx_pair(case: Path, mutate, images: str = "images.idx.gz", labels: str = "labels.idx.gz") -> None:
    x, y = _digits()
    raw = [gzip.compress(_idx(x), mtime=0), gzip.compress(_idx(y), mtime=0)]
    which = int(np.random.default_rng(len(str(case))).integers(0, 2))
    raw[which] = mutate(raw[which])
    (case / images).write_bytes(raw[0])
    (case / labels).write_bytes(raw[1])


def _digit_args(case: Path) -> list[str]:
    return ["--images", str(case / "images.idx.gz"), "--labels", str(case / "labels.idx.gz"), "--num-shards", "1"]


def test_mnist_idx(tmp_path):
    _fuzz(
        tmp_path,
        "mnist",
        _idx_pair,
        lambda c: ["mnist", *_digit_args(c), "--out", str(c / "out")],
        _mutate_maybe_inside_gzip,
    )


def test_mnist_csv(tmp_path):
    x, y = _digits(20)
    rows = "\n".join(",".join(map(str, [*xi.reshape(-1), yi])) for xi, yi in zip(x, y)).encode()
    _fuzz(
        tmp_path,
        "mnist-csv",
        lambda c, m: (c / "d.csv").write_bytes(m(rows, True)),
        lambda c: ["mnist", "--csv", str(c / "d.csv"), "--num-shards", "1", "--out", str(c / "out")],
        _mutate,
    )


def test_stackedmnist(tmp_path):
    _fuzz(
        tmp_path,
        "stackedmnist",
        _idx_pair,
        lambda c: ["stackedmnist", *_digit_args(c), "--num-samples", "30", "--out", str(c / "out")],
        _mutate_maybe_inside_gzip,
    )


def test_mnist_anomaly(tmp_path):
    _fuzz(
        tmp_path,
        "mnist-anomaly",
        _idx_pair,
        lambda c: ["mnist-anomaly", *_digit_args(c), "--digit", "1", "--out", str(c / "out")],
        _mutate_maybe_inside_gzip,
    )


def test_fashion_mnist(tmp_path):
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )

    def write(case, mutate):
        x, y = _digits()
        files = [gzip.compress(_idx(a), mtime=0) for a in (x, y, x[:20], y[:20])]
        which = int(np.random.default_rng(len(str(case))).integers(0, 4))
        files[which] = mutate(files[which])
        for name, data in zip(names, files):
            (case / name).write_bytes(data)

    _fuzz(
        tmp_path,
        "fashion-mnist",
        write,
        lambda c: ["fashion-mnist", "--dir", str(c), "--num-shards", "1", "--out", str(c / "out")],
        _mutate_maybe_inside_gzip,
    )


def _cifar_archive(mutate) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in ("data_batch_1", "test_batch"):
            batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": list(range(6))}
            data = pickle.dumps(batch, protocol=2)
            if name == "test_batch":
                data = mutate(data)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_cifar10(tmp_path):
    def write(case, mutate):
        inner = np.random.default_rng(len(str(case))).random() < 0.5
        archive = _cifar_archive(mutate if inner else (lambda d: d))
        (case / "c.tar.gz").write_bytes(archive if inner else mutate(archive))

    _fuzz(
        tmp_path,
        "cifar10",
        write,
        lambda c: ["cifar10", "--archive", str(c / "c.tar.gz"), "--num-shards", "1", "--out", str(c / "out")],
        _mutate,
    )


def test_kdd(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(60):
        numeric = [str(int(v)) for v in rng.integers(0, 100, 38)]
        label = "normal." if i % 3 == 0 else "smurf."
        lines.append(",".join([numeric[0], ["tcp", "udp"][i % 2], ["http", "ftp"][i % 2], "SF", *numeric[1:], label]))
    text = "\n".join(lines).encode()
    _fuzz(
        tmp_path,
        "kdd",
        lambda c, m: (c / "k.csv").write_bytes(m(text, True)),
        lambda c: ["kdd", "--csv", str(c / "k.csv"), "--num-shards", "1", "--out", str(c / "out")],
        _mutate,
    )


def test_images(tmp_path):
    def write(case, mutate):
        rng = np.random.default_rng(1)
        for label in ("a", "b"):
            (case / "imgs" / label).mkdir(parents=True)
            for k in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                data = buf.getvalue()
                (case / "imgs" / label / f"{k}.png").write_bytes(mutate(data) if (label, k) == ("b", 1) else data)

    _fuzz(
        tmp_path,
        "images",
        write,
        lambda c: ["images", "--folder", str(c / "imgs"), "--num-shards", "1", "--out", str(c / "out")],
        _mutate,
    )


def test_arrays(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8), y=np.arange(12) % 3)
    _fuzz(
        tmp_path,
        "arrays",
        lambda c, m: (c / "a.npz").write_bytes(m(buf.getvalue())),
        lambda c: ["arrays", "--x", str(c / "a.npz"), "--num-shards", "1", "--out", str(c / "out")],
        _mutate,
    )


@pytest.mark.parametrize("pixel", [256, -1])
def test_pixel_values_out_of_range_are_refused_not_wrapped(tmp_path, pixel):
    x, y = _digits(2)
    rows = [",".join(map(str, [*xi.reshape(-1), yi])) for xi, yi in zip(x, y)]
    rows[1] = ",".join([str(pixel), *rows[1].split(",")[1:]])
    (tmp_path / "d.csv").write_text("\n".join(rows))
    code, err = _run(["mnist", "--csv", str(tmp_path / "d.csv"), "--out", str(tmp_path / "out")])
    assert code == 2 and "0..255" in err, err
    big = x.astype(">i4")
    big[0, 0, 0] = 300
    (tmp_path / "i.idx").write_bytes(_idx(big))
    (tmp_path / "l.idx").write_bytes(_idx(y))
    code, err = _run(
        [
            "mnist",
            "--images",
            str(tmp_path / "i.idx"),
            "--labels",
            str(tmp_path / "l.idx"),
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    assert code == 2 and "0..255" in err, err
