"""Parses one whole shard (its bytes) into arrays of keys, samples and labels.

Shards written by ShardWriter give every sample the same tar layout, so the fast path checks all
headers (magic, checksum, name, size) and slices the samples out with numpy, with no Python work
per sample; anything else that is a valid WebDataset shard of ``.x.npy`` + ``.cls`` samples goes
through tarfile. Structural damage raises CorruptShard (the stream skips the shard and counts it).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split


class CorruptShard(Exception):
    """A shard that cannot be parsed: truncated, overwritten, or not a tar file."""


@dataclass
class ShardArrays:
    keys: np.ndarray  # str, one per sample, unique within a manifest
    x: np.ndarray  # (n, *sample_shape), as stored
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> ShardArrays:
        return ShardArrays(self.keys[index], self.x[index], self.labels[index])

    @staticmethod
    def concat(parts: list[ShardArrays]) -> ShardArrays:
        if len(parts) == 1:
            return parts[0]
        return ShardArrays(
            np.concatenate([p.keys for p in parts]),
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )


class _NotUniform(Exception):
    pass


def _octal(field: np.ndarray) -> np.ndarray:
    """Vectorized parse of zero-padded octal tar fields, one row per header."""
    digits = field.astype(np.int64) - ord("0")
    if ((digits < 0) | (digits > 7)).any():
        raise _NotUniform
    return digits @ (8 ** np.arange(field.shape[1] - 1, -1, -1, dtype=np.int64))


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _first_sample_layout(data: bytes) -> tuple[list[tuple[str, int, int]], int, int]:
    """(extension, header offset, size) of each member of the first sample, the record length,
    and the key's length."""
    members: list[tuple[str, int, int]] = []
    off, key = 0, None
    while off + BLOCK <= len(data):
        header = data[off : off + BLOCK]
        if header == _ZERO_BLOCK:
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _NotUniform from e
        m = _KEY_RE.match(info.name)
        if m is None or not info.isreg():
            raise _NotUniform
        if key is None:
            key = m.group(1)
        elif m.group(1) != key:
            break
        members.append((m.group(2), off, info.size))
        off += BLOCK + _padded(info.size)
    if not members or key is None:
        raise _NotUniform
    return members, off, len(key.encode())


def _parse_uniform(data: bytes) -> ShardArrays:
    members, record, klen = _first_sample_layout(data)
    n = (len(data) - 2 * BLOCK) // record
    if n < 1:
        raise _NotUniform
    recs = np.frombuffer(data, np.uint8, count=n * record).reshape(n, record)
    # Records after the last sample are the end-of-archive zeros: find where samples stop.
    magic = (recs[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
    if not magic.all():
        n = int(np.argmin(magic))
        if n < 1 or magic[n:].any():
            raise _NotUniform
        recs = recs[:n]
    if data[n * record : n * record + BLOCK] != _ZERO_BLOCK:
        raise _NotUniform
    first_key = recs[:, :klen]
    fields: dict[str, tuple[int, np.ndarray]] = {}
    for ext, h, size in members:
        hdr = recs[:, h : h + BLOCK]
        if not (hdr[:, 257:262] == hdr[0, 257:262]).all() or not np.isin(hdr[:, 156], (ord("0"), 0)).all():
            raise _NotUniform
        stored = _octal(hdr[:, 148:154])
        actual = hdr.sum(axis=1, dtype=np.int64) - hdr[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
        if (stored != actual).any():
            raise _NotUniform
        name_tail = (b"." + ext.encode() + b"\0")[: 100 - klen]
        if (
            not (hdr[:, :klen] == first_key).all()
            or not (hdr[:, klen : klen + len(name_tail)] == np.frombuffer(name_tail, np.uint8)).all()
        ):
            raise _NotUniform
        sizes = _octal(hdr[:, 124:135])
        if ((sizes + BLOCK - 1) // BLOCK != -(-size // BLOCK)).any():
            raise _NotUniform
        fields[ext] = (h + BLOCK, sizes)
    if "x.npy" not in fields or "cls" not in fields:
        raise CorruptShard(f"samples have members {sorted(fields)}, expected x.npy and cls")

    x_off, x_sizes = fields["x.npy"]
    if (x_sizes != x_sizes[0]).any():
        raise _NotUniform
    head = io.BytesIO(recs[0, x_off : x_off + int(x_sizes[0])].tobytes())
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except ValueError as e:
        raise CorruptShard(f"bad .npy header: {e}") from None
    hlen = head.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if fortran or dtype.hasobject or hlen + nbytes != int(x_sizes[0]):
        raise _NotUniform
    if not (recs[:, x_off : x_off + hlen] == recs[0, x_off : x_off + hlen]).all():
        raise _NotUniform
    x = np.ascontiguousarray(recs[:, x_off + hlen : x_off + hlen + nbytes]).view(dtype).reshape(n, *shape)

    c_off, c_sizes = fields["cls"]
    width = int(c_sizes.max())
    text = np.ascontiguousarray(recs[:, c_off : c_off + width]).view(f"S{width}").ravel()
    try:
        labels = text.astype(np.int64)
    except ValueError as e:
        raise CorruptShard(f"bad label: {e}") from None
    keys = np.ascontiguousarray(first_key).view(f"S{klen}").ravel().astype(str)
    return ShardArrays(keys, x, labels)


def _parse_generic(data: bytes) -> ShardArrays:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                m = _KEY_RE.match(info.name)
                if not info.isreg() or m is None:
                    continue
                f = tar.extractfile(info)
                samples.setdefault(m.group(1), {})[m.group(2)] = f.read() if f else b""
        keys, xs, labels = [], [], []
        for key, sample in samples.items():
            keys.append(key)
            xs.append(np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False))
            labels.append(int(sample["cls"]))
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError) as e:
        raise CorruptShard(f"{type(e).__name__}: {e}") from None
    if not keys:
        raise CorruptShard("no samples")
    try:
        x = np.stack(xs)
    except ValueError as e:
        raise CorruptShard(f"samples of different shapes: {e}") from None
    return ShardArrays(np.array(keys, dtype=str), x, np.array(labels, dtype=np.int64))


def parse_shard(data: bytes) -> ShardArrays:
    """All samples of one shard, in their order in the file."""
    try:
        return _parse_uniform(data)
    except _NotUniform:
        return _parse_generic(data)
