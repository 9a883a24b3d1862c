"""Reading one shard: its URL opened (local paths plainly, every remote scheme through fsspec, the
program-running schemes only when allowed), its bytes read in blocks that must each arrive within
data.io_timeout, and its samples parsed and checked against the manifest. The stream's workers and
the tools read shards here.
"""

from __future__ import annotations

import importlib
import io
import os
import tarfile
from functools import partial

import fsspec
import numpy as np

from data_pipeline.config import COMMAND_SCHEMES, DEFAULT_MAX_SAMPLE_BYTES
from data_pipeline.decode import DecodeSpec, gunzip_shard, parse_webdataset_shard
from data_pipeline.shard_reader import CorruptShard, SampleTooLarge, ShardArrays, parse_shard
from data_pipeline.shards import ALLOW_COMMANDS_ENV, DataError, Manifest, ShardInfo, is_command_url
from data_pipeline.storage import bounded, made_progress

# webdataset's package re-exports the gopen *function* under the module's name.
wds_gopen = importlib.import_module("webdataset.gopen")

# Schemes that webdataset would otherwise route to curl/aws binaries or reject: send them to fsspec.
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "memory", "http", "https", "az", "abfs", "hdfs", "sftp", "ftp")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    # block_size is a file option: given to fsspec.open it would reach the filesystem's
    # constructor, which s3fs rejects.
    fs, path = fsspec.core.url_to_fs(url)
    if "http" in fs.protocol and mode == "rb":
        # One streamed GET (block_size=0): read in blocks, a random-access http file makes a range
        # request per block, which servers without range support (python -m http.server) refuse.
        return fs.open(path, mode, block_size=0)
    return fs.open(path, mode, block_size=max(bufsize, 1 << 20))


def _command_gopen(opener):
    def open_allowed(url: str, *args, **kwargs):
        if os.environ.get(ALLOW_COMMANDS_ENV) != "1":
            raise DataError(
                f"{url!r} runs a program when it is opened; refused. Pass --allow-pipe on the command line to allow it."
            )
        return opener(url, *args, **kwargs)

    open_allowed.guards = opener
    return open_allowed


def register_fsspec_opener() -> None:
    """Makes webdataset open every non-local URL through fsspec, and the program-running schemes
    only when allowed (idempotent)."""
    for scheme in FSSPEC_SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _fsspec_gopen
    for scheme in COMMAND_SCHEMES:
        opener = wds_gopen.gopen_schemes.get(scheme)
        if opener is not None and not hasattr(opener, "guards"):
            wds_gopen.gopen_schemes[scheme] = _command_gopen(opener)


register_fsspec_opener()


# Shards are read block by block, each block reported to the storage wait (made_progress): data.io_timeout
# then bounds a stall, not a whole shard, which over a slow link may take longer and still arrive. A
# block of an object store is one ranged request: big blocks keep their latency negligible, and a link
# must still bring one block within data.io_timeout (64 MiB in 60 s: about 1.1 MB/s).
READ_BLOCK_BYTES = 64 << 20


def _gopen_read(url: str) -> bytes:
    blocks = []
    with wds_gopen.gopen(url, "rb") as f:
        while block := f.read(READ_BLOCK_BYTES):
            blocks.append(block)
            if not made_progress():
                return b""  # given up (timed out, or a stop): nobody waits for it, and leaving closes the handle
    return b"".join(blocks)


HEAD_BYTES = 4096  # a tar member's header (512) and an .npy header (at most a few hundred bytes)


def check_first_sample(manifest: Manifest) -> None:
    """Raises DataError when the first shard's first sample is not of the manifest's shape and dtype:
    read from the shard's first few KB, before any work (found at the first batch, a run had written its
    step-0 checkpoint for the wrong shape). This project's layout only, uncompressed and not from a
    command; whatever cannot be read so is left to the full check when the shard is read."""
    if manifest.layout != "meg" or not manifest.shards:
        return
    url = manifest.shard_urls()[0]
    if is_command_url(url):
        return
    try:
        head = bounded(partial(_read_head, url), url, "shard header read")
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|") as tar:
            member = next((m for m in tar if m.name.endswith(".x.npy")), None)  # after its .cls
            if member is None:
                return
            npy = tar.extractfile(member)
            version = np.lib.format.read_magic(npy)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(npy)
    except (OSError, tarfile.TarError, ValueError, EOFError):
        return
    if list(shape) != list(manifest.sample_shape) or str(dtype) != manifest.dtype:
        raise DataError(
            f"shard {url} holds samples of shape {list(shape)} {dtype}, its manifest says {manifest.sample_shape} "
            f"{manifest.dtype}: the manifest is not these shards'; convert the data set again"
        )


def _read_head(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read(HEAD_BYTES)


def read_shard_bytes(url: str) -> bytes:
    """One shard's bytes through webdataset's opener table (local paths, fsspec, and when allowed
    pipe:), bounded by data.io_timeout per block. A program that fails is a DataError, reported once:
    it is not a damaged shard to skip."""
    try:
        return bounded(partial(_gopen_read, url), url, "shard read")
    except OSError as e:
        if is_command_url(url):
            raise DataError(f"{url!r} failed: {e}") from None
        raise


class ReadBuffer:
    """A reusable buffer for local shard files: reading into memory that is already mapped is 2-4x
    faster than into a fresh allocation (no page faults, and none of the kernel's zeroing)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def read(self, path: str) -> memoryview:
        """The file's bytes, bounded by data.io_timeout per block (a hung network filesystem)."""
        return bounded(partial(self._read, path), path, "shard read", on_abandon=self._forget)

    def _forget(self) -> None:
        self._data = bytearray()  # a read that timed out may still write into the old one

    def _read(self, path: str) -> memoryview:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if len(self._data) < size:
                self._data = bytearray(size)  # replaced, not resized: old views may still exist
            view = memoryview(self._data)[:size]
            got = 0
            while got < size:  # in blocks (the progress the wait sees); a read(2) may also return less
                n = f.readinto(view[got : got + READ_BLOCK_BYTES])
                if not n:
                    break
                got += n
                if not made_progress():
                    break  # given up: the buffer is no longer this reader's (_forget)
        return view[:got]


def prefetch_hint(url: str) -> None:
    """Asks the kernel to start reading a local file into the page cache (no-op elsewhere)."""
    path = _local_path(url)
    if path is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a missing shard is reported when it is read
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url or is_command_url(url) else url


def load_shard(url: str, info: ShardInfo, manifest: Manifest, buffer: ReadBuffer | None = None) -> ShardArrays:
    """Reads and parses one shard; CorruptShard if it is damaged, DataError if its samples are not
    what the manifest describes. With ``buffer``, a local shard is read into it, and the samples
    point into it until the next read."""
    try:
        path = _local_path(url)
        data = buffer.read(path) if buffer is not None and path is not None else read_shard_bytes(url)
    except FileNotFoundError:
        raise DataError(f"shard {url} has disappeared since start-up") from None
    if info.num_bytes and len(data) != info.num_bytes:
        raise CorruptShard(f"{len(data)} bytes, the manifest says {info.num_bytes} (truncated or rewritten)")
    try:
        arrays = parse_any_shard(data, manifest.layout, DecodeSpec(**manifest.decode), manifest.max_sample_bytes)
    except SampleTooLarge as e:
        raise DataError(f"shard {url}: {e}") from None
    if len(arrays) != info.num_samples:
        # Damage in place (a renamed member) or a manifest of other shards: skipped and counted like
        # any corrupt shard, and an epoch of them stops the run with this message.
        raise CorruptShard(
            f"{len(arrays)} samples, the manifest says {info.num_samples} (damaged, or the manifest is "
            "not this shard's: convert again)"
        )
    if list(arrays.x.shape[1:]) != list(manifest.sample_shape) or str(arrays.x.dtype) != manifest.dtype:
        raise DataError(
            f"shard {url} holds samples of shape {list(arrays.x.shape[1:])} {arrays.x.dtype}, its manifest "
            f"says {manifest.sample_shape} {manifest.dtype}"
        )
    return arrays


def parse_any_shard(data: bytes | memoryview, layout: str, spec: DecodeSpec, max_sample_bytes: int = 0) -> ShardArrays:
    """A shard's samples: the fast parser for this project's layout, webdataset's decoders otherwise.
    A member or decoded sample above ``max_sample_bytes`` (0: the default) is SampleTooLarge."""
    bound = max_sample_bytes or DEFAULT_MAX_SAMPLE_BYTES
    if layout == "webdataset":
        return parse_webdataset_shard(data, spec, bound)
    return parse_shard(gunzip_shard(data, bound))


def expected_samples(layout: str, spec: DecodeSpec) -> str:
    """What the reader of ``layout`` expects in a shard, for error messages."""
    return spec.describe() if layout == "webdataset" else "this project's {key}.x.npy + {key}.cls samples"
