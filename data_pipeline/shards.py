"""Writing WebDataset shards and their manifest to any fsspec URL, and reading the manifest back.

Every sample is a tar member group: ``<key>.x.npy`` (the array), ``<key>.cls`` (an integer label).
A shard is written to a local temporary file and only then moved (local) or uploaded (remote) to
its final name, so no reader ever sees a half-written shard; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import webdataset as wds

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's folder
    num_samples: int


@dataclass
class Manifest:
    name: str
    split: str
    sample_shape: list[int]
    dtype: str  # dtype stored on disk: float32, or uint8 (images, decoded to [-1, 1])
    shards: list[ShardInfo]
    class_counts: dict[str, int] = field(default_factory=dict)
    source_checksum: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    base_url: str = ""  # where the manifest was read from; not stored

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_urls(self) -> list[str]:
        return [join_url(self.base_url, s.url) for s in self.shards]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("base_url")
        d["num_samples"] = self.num_samples
        return json.dumps(d, indent=2, sort_keys=True)


def join_url(base: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(base, name) if "://" in base else os.path.join(base, name)


def manifest_url(url: str) -> str:
    """Accepts a folder or the manifest file itself."""
    return url if url.endswith(".json") else join_url(url, MANIFEST_NAME)


class DataError(RuntimeError):
    """Missing, malformed or inconsistent data: raised before any training starts."""


def read_manifest(url: str, check_shards: bool = True) -> Manifest:
    """Loads a manifest and (by default) checks that every shard it lists exists."""
    murl = manifest_url(url)
    try:
        with fsspec.open(murl, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"no manifest at {murl}: write the shards first, e.g. "
            f"`python -m data_pipeline.convert toy --dataset 25gaussians --out {url}`"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"manifest {murl} is not valid JSON: {e}") from None
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        raw.pop("num_samples", None)
        manifest = Manifest(shards=shards, **raw, base_url=posixpath.dirname(murl) if "://" in murl else os.path.dirname(murl))
    except (KeyError, TypeError) as e:
        raise DataError(f"manifest {murl} is malformed: {e}") from None
    if not manifest.shards:
        raise DataError(f"manifest {murl} lists no shards")
    if check_shards:
        fs, _ = fsspec.core.url_to_fs(murl)
        missing = [u for u in manifest.shard_urls() if not fs.exists(fsspec.core.url_to_fs(u)[1])]
        if missing:
            raise DataError(f"manifest {murl} lists {len(missing)} missing shard(s), first: {missing[0]}")
    return manifest


def put_file_atomic(local_path: str, url: str) -> None:
    """Moves a finished local file to ``url``: a rename for local targets, an upload otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.protocol in ("file", "local") or "file" in getattr(fs, "protocol", ()):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.replace(local_path, path)
    else:
        # Object stores publish an object only once its upload completes.
        fs.put_file(local_path, path)
        os.remove(local_path)


def write_text_atomic(text: str, url: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=_local_dir_for(url))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    put_file_atomic(tmp, url)


def _local_dir_for(url: str) -> str | None:
    """A temp folder on the target's own filesystem for local targets (so rename is atomic)."""
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        return d
    return None


class ShardWriter:
    """Writes samples into shards ``{name}-{split}-{index:06d}.tar`` under ``out_url``."""

    def __init__(self, out_url: str, name: str, split: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_url, self.name, self.split = out_url.rstrip("/"), name, split
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self.class_counts: dict[str, int] = {}
        self.sample_shape: list[int] | None = None
        self.dtype: str | None = None
        self._tar: wds.TarWriter | None = None
        self._tmp_path = ""
        self._in_shard = 0
        self._index = 0

    def _open(self) -> None:
        fd, self._tmp_path = tempfile.mkstemp(suffix=".tar.partial", dir=_local_dir_for(self._shard_url()))
        self._stream = os.fdopen(fd, "wb")
        self._tar = wds.TarWriter(self._stream)
        self._in_shard = 0

    def _shard_name(self) -> str:
        return f"{self.name}-{self.split}-{len(self.shards):06d}.tar"

    def _shard_url(self) -> str:
        return join_url(self.out_url, self._shard_name())

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        put_file_atomic(self._tmp_path, self._shard_url())
        self.shards.append(ShardInfo(self._shard_name(), self._in_shard))
        self._tar = None

    def write(self, x: np.ndarray, label: int) -> None:
        if self.sample_shape is None:
            self.sample_shape, self.dtype = list(x.shape), str(x.dtype)
        elif list(x.shape) != self.sample_shape or str(x.dtype) != self.dtype:
            raise ValueError(f"sample {self._index} has shape {x.shape} {x.dtype}, expected {self.sample_shape} {self.dtype}")
        if self._tar is None:
            self._open()
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        self._tar.write({"__key__": f"{self._index:09d}", "x.npy": buf.getvalue(), "cls": str(int(label)).encode()})
        self.class_counts[str(int(label))] = self.class_counts.get(str(int(label)), 0) + 1
        self._index += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def finish(self, source_checksum: str = "", preprocessing: dict[str, Any] | None = None) -> Manifest:
        """Closes the last shard and writes the manifest (last, so its presence means complete)."""
        if self._tar is not None:
            self._close_shard()
        if not self.shards:
            raise ValueError("no samples were written")
        manifest = Manifest(
            name=self.name,
            split=self.split,
            sample_shape=self.sample_shape or [],
            dtype=self.dtype or "",
            shards=self.shards,
            class_counts=dict(sorted(self.class_counts.items(), key=lambda kv: int(kv[0]))),
            source_checksum=source_checksum,
            preprocessing=preprocessing or {},
        )
        write_text_atomic(manifest.to_json(), join_url(self.out_url, MANIFEST_NAME))
        manifest.base_url = self.out_url
        return manifest


def sha256_of(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_array_shards(
    out_url: str,
    name: str,
    split: str,
    arrays: np.ndarray,
    labels: np.ndarray,
    num_shards: int,
    source_checksum: str = "",
    preprocessing: dict[str, Any] | None = None,
) -> Manifest:
    """Writes ``arrays`` into ``num_shards`` shards of near-equal size (equal when it divides)."""
    per_shard = -(-len(arrays) // num_shards)
    writer = ShardWriter(out_url, name, split, per_shard)
    for x, y in zip(arrays, labels):
        writer.write(x, int(y))
    return writer.finish(source_checksum, preprocessing)
