"""Parses one whole shard (its bytes) into arrays of keys, samples and labels.

Shards written by ShardWriter give every sample the same tar layout, so the fast path checks all
headers (magic, checksum, name, size) and slices the samples out with numpy, with no Python work
per sample; anything else that is a valid WebDataset shard of ``.x.npy`` + ``.cls`` samples goes
through tarfile. Structural damage raises CorruptShard (the stream skips the shard and counts it).
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11 keeps the AST constructor's
# recursion depth in shared state: two threads parsing at once can fail with a spurious "SystemError:
# AST constructor recursion depth mismatch" (python/cpython#106905; seen here with 2 thread workers).
# Headers as numpy writes them are read below without ast; any other numpy load runs under this lock.
NUMPY_AST_LOCK = threading.Lock()
_NPY_HEADER_RE = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), 'shape': \(((?:\d+, )*\d*,?)\), \} *\n$"
)


def read_npy_header(head: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy array at ``head``, which is left at its data."""
    version = np.lib.format.read_magic(head)
    start = head.tell()
    size_format = "<H" if version == (1, 0) else "<I"
    (length,) = struct.unpack(size_format, head.read(struct.calcsize(size_format)))
    match = _NPY_HEADER_RE.match(head.read(length).decode("latin1"))
    if match is not None:
        shape = tuple(int(d) for d in match.group(3).replace(",", " ").split())
        return shape, match.group(2) == "True", np.dtype(match.group(1))
    head.seek(start)
    with NUMPY_AST_LOCK:
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(head)


class CorruptShard(Exception):
    """A shard that cannot be parsed: truncated, overwritten, or not a tar file."""


class SampleTooLarge(CorruptShard):
    """A member (decompressed) or decoded sample above the bound (data.max_sample_bytes): not damage to
    skip but data this configuration refuses; the reader stops naming the shard and the key."""


def check_label(label: int, key: str) -> int:
    """``label`` when it fits in int64 (the labels' type), else CorruptShard naming the sample."""
    if not -(2**63) <= label < 2**63:
        text = str(label)
        raise CorruptShard(f"sample {key!r} has label {text[:20]}... ({len(text)} digits): it does not fit in 64 bits")
    return label


@dataclass
class ShardArrays:
    keys: np.ndarray  # str, one per sample, unique within a manifest
    x: np.ndarray  # (n, *sample_shape), as stored; may be a read-only view into the shard's bytes
    labels: np.ndarray  # int64
    # Samples without the member the decode settings read (WebDataset shards of other tools), by the
    # members they hold (".cls .gif" -> count): left out, and said where shards are indexed.
    left_out: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> ShardArrays:
        return ShardArrays(self.keys[index], self.x[index], self.labels[index])

    def owned(self) -> ShardArrays:
        """A copy whose samples no longer point into the shard's bytes."""
        return ShardArrays(self.keys, np.array(self.x), self.labels)

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
        header = bytes(data[off : off + BLOCK])
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


# Bytes of a member's header that differ between the samples of a uniform shard, as whole 8-byte
# words: the key at the start of the name, the size field (124-135) and the checksum (148-155).
# Every other word must equal the first sample's, whose header tarfile has validated, so each
# checksum can be verified from the varying bytes alone.
_SIZE_WORDS = (15, 17)  # bytes 120-135
_CHECKSUM_WORDS = (18, 20)  # bytes 144-159


def _rows_equal_first(recs: np.ndarray, words: np.ndarray, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) of every record equal the first record's."""
    lo, hi = -(-start // 8), stop // 8
    if lo >= hi:
        return bool((recs[:, start:stop] == recs[0, start:stop]).all())
    return bool(
        (recs[:, start : lo * 8] == recs[0, start : lo * 8]).all()
        and (words[:, lo:hi] == words[0, lo:hi]).all()
        and (recs[:, hi * 8 : stop] == recs[0, hi * 8 : stop]).all()
    )


def _check_member_headers(recs: np.ndarray, words: np.ndarray, h: int, klen: int) -> np.ndarray:
    """Validates the headers at byte ``h`` of every record (same layout as the first record's,
    checksums right) and returns the members' sizes."""
    key_words = -(-klen // 8)
    base = h // 8
    (s0, s1), (c0, c1) = _SIZE_WORDS, _CHECKSUM_WORDS
    fixed = [(key_words, s0), (s1, c0), (c1, BLOCK // 8)]
    if not all((words[:, base + a : base + b] == words[0, base + a : base + b]).all() for a, b in fixed):
        raise _NotUniform
    hdr = recs[:, h : h + BLOCK]
    # Inside the varying words, only the key, the size digits (not their terminator, byte 135) and the
    # checksum digits may vary.
    for a, b in ((klen, key_words * 8), (s0 * 8, 124), (135, 136), (c0 * 8, 148), (154, c1 * 8)):
        if not (hdr[:, a:b] == hdr[0, a:b]).all():
            raise _NotUniform
    stored = _octal(hdr[:, 148:154])
    varying = np.concatenate(
        [hdr[:, : key_words * 8], hdr[:, s0 * 8 : s1 * 8], hdr[:, c0 * 8 : 148], hdr[:, 156 : c1 * 8]], axis=1
    )
    row_sums = varying.sum(axis=1, dtype=np.int64)
    first = hdr[0].astype(np.int64)
    first_checksum = first.sum() - first[148:156].sum() + 8 * ord(" ")
    if (stored != first_checksum - row_sums[0] + row_sums).any():
        raise _NotUniform
    return _octal(hdr[:, 124:135])


def _parse_uniform(data: bytes) -> ShardArrays:
    members, record, klen = _first_sample_layout(data)
    n = (len(data) - 2 * BLOCK) // record
    if n < 1:
        raise _NotUniform
    recs = np.frombuffer(data, np.uint8, count=n * record).reshape(n, record)
    # The end-of-archive zeros (at most 2 blocks + tarfile's record padding) may fill the last
    # few records: find where samples stop there. Earlier records' magic is checked with the rest
    # of their headers.
    tail = min(n, (2 * BLOCK + tarfile.RECORDSIZE) // record + 1)
    magic = (recs[n - tail :, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
    if not magic.all():
        cut = int(np.argmin(magic))
        if magic[cut:].any() or n - tail + cut < 1:
            raise _NotUniform
        n = n - tail + cut
        recs = recs[:n]
    if data[n * record : n * record + BLOCK] != _ZERO_BLOCK:
        raise _NotUniform
    # Comparisons run on 8-byte words where they can: the headers are most of a shard's bytes.
    words = recs.view("<u8")
    first_key = recs[:, :klen]
    fields: dict[str, tuple[int, np.ndarray]] = {}
    for ext, h, size in members:
        sizes = _check_member_headers(recs, words, h, klen)
        if not (recs[:, h : h + klen] == first_key).all():
            raise _NotUniform
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
        shape, fortran, dtype = read_npy_header(head)
    except Exception as e:  # noqa: BLE001 (see DAMAGE_NOTE)
        raise CorruptShard(f"bad .npy header: {e}") from None
    hlen = head.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if fortran or dtype.hasobject or hlen + nbytes != int(x_sizes[0]):
        raise _NotUniform
    if not _rows_equal_first(recs, words, x_off, x_off + hlen):
        raise _NotUniform
    # A strided view into ``data``: whoever reorders the samples makes the one copy.
    x = recs[:, x_off + hlen : x_off + hlen + nbytes].view(dtype).reshape(n, *shape)

    c_off, c_sizes = fields["cls"]
    width = int(c_sizes.max())
    text = np.ascontiguousarray(recs[:, c_off : c_off + width]).view(f"S{width}").ravel()
    try:
        labels = text.astype(np.int64)
    except ValueError as e:
        raise CorruptShard(f"bad label: {e}") from None
    except OverflowError:
        raise CorruptShard(f"a .cls label of up to {width} digits does not fit in 64 bits") from None
    keys = np.ascontiguousarray(first_key).view(f"S{klen}").ravel().astype(str)
    return ShardArrays(keys, x, labels)


# DAMAGE_NOTE: parsers of bytes from storage catch every Exception and report the shard as corrupt:
# damaged bytes surface as any type (numpy's .npy header parser raises SyntaxError or TokenError, PIL
# SyntaxError for a broken PNG, DecompressionBombError, MemoryError for a size field gone wild). The
# type and message travel with the report, so a bug of ours still shows, once per shard, by name.


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
            with NUMPY_AST_LOCK:
                xs.append(np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False))
            labels.append(check_label(int(sample["cls"]), key))
    except CorruptShard:
        raise
    except Exception as e:  # noqa: BLE001 (see DAMAGE_NOTE)
        raise CorruptShard(f"{type(e).__name__}: {e}") from None
    if not keys:
        raise CorruptShard("no samples")
    try:
        x = np.stack(xs)
    except ValueError as e:
        raise CorruptShard(f"samples of different shapes: {e}") from None
    return ShardArrays(np.array(keys, dtype=str), x, np.array(labels, dtype=np.int64))


def parse_shard(data: bytes | memoryview) -> ShardArrays:
    """All samples of one shard, in their order in the file. ``x`` may point into ``data``."""
    try:
        return _parse_uniform(data)
    except _NotUniform:
        return _parse_generic(data)
