"""Streams a manifest's shards: split by rank and worker, seeded, resumable.

How every rank gets the same number of batches: the shard list is shuffled with (seed, epoch),
identically on every rank; rank r takes shards r, r + world, ...; its worker w takes every W-th of
those. From the manifest's sample counts each rank computes how many full batches every worker of
every rank will produce, and an epoch is the smallest per-rank total, so no rank waits at the end
of an epoch for a batch another rank does not have. With equal shards whose size is a multiple of
the per-rank batch size (the converters' default), nothing is dropped and every sample of an epoch
is seen exactly once across ranks x workers.

Inside a worker each shard is read whole (local files into reused buffers, anything else through
webdataset's opener table, which sends every remote scheme to fsspec), parsed into arrays
(shard_reader.py), mixed into a shuffle pool with a generator seeded by (seed, epoch, rank,
worker), and cut into batches. Workers hand over chunks of ``chunk_batches`` consecutive batches
(about 8 MiB); batches hold samples as stored, and the consumer decodes them on its device
(decode_samples). Workers are threads (the default: numpy runs outside the GIL and nothing is
copied between processes) or DataLoader processes (chunks travel in shared memory).

Resuming: chunks are taken from the workers round-robin, skipping exhausted ones, and the order of
each worker's batches is a pure function of (seed, epoch, rank), so a position is just (epoch,
batches consumed); exact as long as batch size, workers and sample size stay the same.

A shard that is truncated, corrupt or of another size than the manifest records is skipped with a
warning naming it and counted in the next batch's ``corrupt_shards``; that worker then yields
fewer batches, and that rank ends its epoch early (the trainer's loop goes straight on to the next
epoch, so no rank waits on another). Within such an epoch a resumed position is approximate: the
batch order assumed the lost shard. Samples whose shape or dtype differ from the manifest raise
DataError: the manifest does not describe the data.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import random
import threading
from collections.abc import Iterator

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import WORKER_TYPES, StreamPosition
from data_pipeline.shard_reader import CorruptShard, ShardArrays, parse_shard
from data_pipeline.shards import DataError, Manifest, ShardInfo

log = logging.getLogger(__name__)

# webdataset's package re-exports the gopen *function* under the module's name.
wds_gopen = importlib.import_module("webdataset.gopen")

# Schemes that webdataset would otherwise route to curl/aws binaries or reject: send them to fsspec.
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "memory", "http", "https", "az", "abfs", "hdfs", "sftp", "ftp")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    # block_size is a file option: given to fsspec.open it would reach the filesystem's
    # constructor, which s3fs rejects.
    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, mode, block_size=max(bufsize, 1 << 20))


# Schemes whose webdataset opener runs a program (pipe: a shell command; the others curl or ais).
# A preset, a saved config or a manifest must not run anything: they open only when the user allowed
# it on the command line (--allow-pipe sets this variable, which worker processes inherit).
COMMAND_SCHEMES = ("pipe", "ais", "htgs", "scp", "ftps")
ALLOW_COMMANDS_ENV = "MEG_ALLOW_PIPE"


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


def is_command_url(url: str) -> bool:
    return url.split(":", 1)[0] in COMMAND_SCHEMES and ":" in url


def read_shard_bytes(url: str) -> bytes:
    """One shard's bytes through webdataset's opener table (local paths, fsspec, and when allowed
    pipe:). A program that fails is a DataError, reported once: it is not a damaged shard to skip."""
    try:
        with wds_gopen.gopen(url, "rb") as f:
            return f.read()
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
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if len(self._data) < size:
                self._data = bytearray(size)  # replaced, not resized: old views may still exist
            view = memoryview(self._data)[:size]
            got = 0
            while got < size:  # one read(2) returns at most about 2 GiB, network filesystems less
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
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
    return None if "://" in url or url.startswith("pipe:") else url


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
    arrays = parse_shard(data)
    if len(arrays) != info.num_samples:
        if info.num_bytes:  # the right size with another count: the manifest is not this shard's
            raise DataError(f"shard {url} holds {len(arrays)} samples, its manifest says {info.num_samples}")
        raise CorruptShard(f"{len(arrays)} samples, the manifest says {info.num_samples}")
    if list(arrays.x.shape[1:]) != list(manifest.sample_shape) or str(arrays.x.dtype) != manifest.dtype:
        raise DataError(
            f"shard {url} holds samples of shape {list(arrays.x.shape[1:])} {arrays.x.dtype}, its manifest "
            f"says {manifest.sample_shape} {manifest.dtype}"
        )
    return arrays


def decode_samples(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Model input from samples as stored: uint8 images to float32 in [-1, 1], anything else to
    float32. The stream hands samples over as stored, so the trainer calls this after the copy to
    its device: a quarter of the bytes to move for images, and the device does the arithmetic."""
    if dtype == "uint8":
        return x.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)
    return x.to(torch.float32)


def read_split(manifest: Manifest, limit: int | None = None) -> dict:
    """A whole split in memory, in manifest order: ``x`` (float32 tensor, images in [-1, 1]),
    ``label`` and ``key`` (numpy arrays). For evaluation sets and tools, not for training."""
    parts, total = [], 0
    for url, info in zip(manifest.shard_urls(), manifest.shards):
        if limit is not None and total >= limit:
            break
        try:
            parts.append(load_shard(url, info, manifest))
        except CorruptShard as e:
            raise DataError(f"shard {url} of an evaluation split is unreadable: {e}") from None
        total += len(parts[-1])
    arrays = ShardArrays.concat(parts).take(slice(0, limit))
    # np.array copies: x may be a read-only view into a shard's bytes, and float32 is not converted.
    x = decode_samples(torch.from_numpy(np.array(arrays.x)), manifest.dtype)
    return {"x": x, "label": arrays.labels, "key": arrays.keys}


def manifest_from_urls(urls: str | list[str], name: str = "", split: str = "train") -> Manifest:
    """A manifest for shards named by a brace pattern (``data/mnist-train-{000000..000015}.tar``)
    or a list, built by reading every shard once (counts, sizes, sample shape)."""
    urls = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else list(urls)
    if not urls:
        raise DataError("no shard URLs")
    shards, shape, dtype, counts = [], None, None, {}
    for url in urls:
        try:
            data = read_shard_bytes(url)
        except FileNotFoundError:
            raise DataError(f"shard {url} does not exist") from None
        try:
            arrays = parse_shard(data)
        except CorruptShard as e:
            raise DataError(f"shard {url} is unreadable: {e}") from None
        if shape is None:
            shape, dtype = list(arrays.x.shape[1:]), str(arrays.x.dtype)
        elif shape != list(arrays.x.shape[1:]) or dtype != str(arrays.x.dtype):
            raise DataError(
                f"shard {url} holds {list(arrays.x.shape[1:])} {arrays.x.dtype}, the first held {shape} {dtype}"
            )
        for label, c in zip(*np.unique(arrays.labels, return_counts=True), strict=True):
            counts[str(label)] = counts.get(str(label), 0) + int(c)
        shards.append(ShardInfo(url, len(arrays), len(data)))
    return Manifest(name or "shards", split, shape or [], dtype or "", shards, class_counts=counts)


# What a worker hands over is a chunk of several consecutive batches: one message per batch cost
# more than all the parsing. From a worker process the samples travel as a torch tensor in shared
# memory (its fixed cost per message is amortised over the chunk) and the small labels and keys
# are pickled; from a worker thread nothing is copied.
CHUNK_BYTES = 8 << 20
MAX_CHUNK_BATCHES = 64


def _chunk(parts: list[tuple[ShardArrays, np.ndarray]], corrupt: int, batch_size: int, shared: bool) -> dict:
    """The chunk made of ``rows`` of each ``(pool, rows)`` part, in order."""
    n = sum(len(rows) for _, rows in parts)
    if not parts:  # only corrupt shards to report
        return {"x": torch.empty(0), "label": np.zeros(0, np.int64), "key": np.zeros(0, str), "batches": 0,
                "corrupt_shards": corrupt}  # fmt: skip
    first = parts[0][0].x
    if shared:  # for another process: gathered straight into shared memory, sending it copies nothing more
        x = torch.empty((n, *first.shape[1:]), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype)
        x.share_memory_()
    else:  # numpy asks for transparent huge pages: a fresh chunk then costs far fewer page faults
        x = torch.from_numpy(np.empty((n, *first.shape[1:]), first.dtype))
    out, at = x.numpy(), 0
    for pool, rows in parts:
        np.take(pool.x, rows, axis=0, out=out[at : at + len(rows)])
        at += len(rows)
    return {
        "x": x,
        "label": np.concatenate([pool.labels[rows] for pool, rows in parts]),
        "key": np.concatenate([pool.keys[rows] for pool, rows in parts]),
        "batches": n // batch_size,
        "corrupt_shards": corrupt,
    }


def _no_collate(batch: dict) -> dict:
    return batch


# Thread workers share the consumer's memory, so a chunk costs nothing to hand over; the work in a
# worker is numpy on whole shards and file reads, which release the GIL, so threads run in
# parallel. Process workers (a DataLoader) isolate the reading but pay for every byte they send.
_DONE = object()


def _threaded_chunks(dataset: _EpochDataset, workers: int, prefetch: int = 2) -> Iterator[dict]:
    """The workers' chunks in the order a DataLoader would give them: round-robin over the
    workers, skipping exhausted ones. A worker's error is raised here."""
    queues = [queue.Queue(maxsize=prefetch) for _ in range(workers)]
    stop = threading.Event()

    def put(worker: int, item: object) -> bool:
        while not stop.is_set():
            try:
                queues[worker].put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(worker: int) -> None:
        try:
            for chunk in dataset.worker_chunks(worker):
                if not put(worker, chunk):
                    return
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, which raises it)
            put(worker, e)
            return
        put(worker, _DONE)

    threads = [threading.Thread(target=run, args=(w,), name=f"shard-reader-{w}", daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        active = list(range(workers))
        while active:
            for worker in list(active):
                item = queues[worker].get()
                if item is _DONE:
                    active.remove(worker)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
    finally:
        stop.set()
        for t in threads:
            if t is not threading.current_thread():  # the generator may be collected on a reader thread
                t.join()


class ShardStream:
    """One rank's view of a sharded data set; iterate ``epoch_batches(position)`` for batches."""

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        chunk_batches: int | None = None,
        worker_type: str = "thread",
    ):
        if len(manifest.shards) < world_size * max(num_workers, 1):
            raise ValueError(
                f"{manifest.name}: {len(manifest.shards)} shards cannot feed {world_size} ranks x "
                f"{max(num_workers, 1)} workers; write more shards or use fewer workers"
            )
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker type {worker_type!r}: choose one of {', '.join(WORKER_TYPES)}")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of {world_size}, batch size {batch_size}")
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.num_workers, self.worker_type = batch_size, num_workers, worker_type
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        sample_bytes = int(np.prod(manifest.sample_shape, dtype=np.int64)) * np.dtype(manifest.dtype).itemsize
        self.chunk_batches = chunk_batches or max(1, min(MAX_CHUNK_BATCHES, CHUNK_BYTES // (batch_size * sample_bytes)))
        self._unreported_corrupt = 0  # counted in a chunk without batches; goes with the next batch
        self.urls = manifest.shard_urls()
        self.counts = [s.num_samples for s in manifest.shards]
        if self.batches_per_epoch(0) == 0:
            raise ValueError(
                f"{manifest.name}: {manifest.num_samples} samples give rank {rank} no full batch of {batch_size} "
                f"with {max(num_workers, 1)} worker(s) per rank"
            )

    def _assignment(self, epoch: int, rank: int) -> list[list[int]]:
        """Shard indices of each worker of ``rank`` in ``epoch``."""
        order = list(range(len(self.urls)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        mine = order[rank :: self.world_size]
        workers = max(self.num_workers, 1)
        return [mine[w::workers] for w in range(workers)]

    def _worker_batch_counts(self, epoch: int, rank: int) -> list[int]:
        return [sum(self.counts[i] for i in shards) // self.batch_size for shards in self._assignment(epoch, rank)]

    def batches_per_epoch(self, epoch: int) -> int:
        return min(sum(self._worker_batch_counts(epoch, r)) for r in range(self.world_size))

    def epoch_batches(self, position: StreamPosition) -> Iterator[dict]:
        """Yields the rest of ``position.epoch`` from ``position.batches_done`` on (it does not
        advance ``position``: the trainer does, once a batch is consumed). Each batch holds ``x``
        (as stored, e.g. uint8: see decode_samples), ``label`` (int64), ``key`` (a numpy array of
        the samples' keys) and ``corrupt_shards`` (shards skipped since the previous batch)."""
        epoch, done = position.epoch, position.batches_done
        total = self.batches_per_epoch(epoch)
        per_chunk = self.chunk_batches
        counts = self._worker_batch_counts(epoch, self.rank)
        # The DataLoader takes chunks from its workers round-robin, skipping exhausted ones, and
        # always starts a new iterator at worker 0: workers skip the whole rounds of chunks already
        # done, and the batches of a partly consumed round are dropped here.
        resume_round, round_start = 0, 0  # the round holding batch ``done``, and its first batch
        for r in range(-(-max(counts, default=0) // per_chunk)):
            in_round = sum(min(per_chunk, max(c - r * per_chunk, 0)) for c in counts)
            if round_start + in_round > done:
                break
            resume_round, round_start = r + 1, round_start + in_round
        skips = [min(resume_round * per_chunk, c) for c in counts]
        dataset = _EpochDataset(self, epoch, skips)
        if self.num_workers > 0 and self.worker_type == "thread":
            chunks = _threaded_chunks(dataset, self.num_workers)
        else:
            # Its own generator: creating an iterator otherwise draws from the global torch RNG,
            # which would shift the trainer's noise whenever an epoch starts or a run resumes.
            chunks = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_no_collate,
                generator=torch.Generator().manual_seed(self.seed + epoch),
            )
        i = round_start
        for chunk in chunks:
            self._unreported_corrupt += chunk["corrupt_shards"]
            labels, b = torch.from_numpy(chunk["label"]), self.batch_size
            for j in range(chunk["batches"]):
                if i >= total:
                    return
                if i >= done:
                    part = slice(j * b, (j + 1) * b)
                    yield {
                        "x": chunk["x"][part],
                        "label": labels[part],
                        "key": chunk["key"][part],
                        "corrupt_shards": self._unreported_corrupt,
                    }
                    self._unreported_corrupt = 0
                i += 1


class _EpochDataset(IterableDataset):
    def __init__(self, stream: ShardStream, epoch: int, skips: list[int]):
        self.stream, self.epoch, self.skips = stream, epoch, skips

    def __iter__(self) -> Iterator[dict]:  # in a DataLoader process, or in the consumer (0 workers)
        info = get_worker_info()
        return self.worker_chunks(info.id if info is not None else 0, in_process_worker=info is not None)

    def worker_chunks(self, worker: int, in_process_worker: bool = False) -> Iterator[dict]:
        """Worker ``worker``'s chunks of this epoch, in order."""
        s = self.stream
        rng = np.random.default_rng([s.seed, self.epoch, s.rank, worker])
        keep = s.shuffle_buffer if s.shuffle_buffer > 1 else 0
        b, chunk_rows = s.batch_size, s.chunk_batches * s.batch_size
        skip_rows, corrupt = self.skips[worker] * b, 0
        parts: list[tuple[ShardArrays, np.ndarray]] = []  # (pool, rows of it) of the chunk being built
        filled = 0
        mine = s._assignment(self.epoch, s.rank)[worker]
        remaining = iter(range(len(mine)))
        # Two read buffers take turns: the shard being cut into chunks, and the one read ahead.
        buffers = (ReadBuffer(), ReadBuffer())

        def next_good_shard(buffer: ReadBuffer) -> ShardArrays | None:
            nonlocal corrupt
            for k in remaining:
                i = mine[k]
                if k + 1 < len(mine):  # the storage reads the next shard while this one is parsed
                    prefetch_hint(s.urls[mine[k + 1]])
                try:
                    return load_shard(s.urls[i], s.manifest.shards[i], s.manifest, buffer)
                except CorruptShard as e:
                    log.warning("skipping corrupt shard %s: %s", s.urls[i], e)
                    corrupt += 1
            return None

        pool: ShardArrays | None = None
        current, turn = next_good_shard(buffers[0]), 1
        while current is not None:
            # Reading one good shard ahead counts the corrupt shards after this one in this one's
            # chunks, so that a corrupt last shard is reported too.
            upcoming = next_good_shard(buffers[turn])
            # A copy out of the read buffer, which is read into again after the next shard.
            pool = current.owned() if pool is None else ShardArrays.concat([pool, current])
            order = rng.permutation(len(pool)) if keep else np.arange(len(pool))
            floor = keep if upcoming is not None else 0
            usable = max(len(pool) - floor, 0) // b * b
            rows, rest = order[:usable], order[usable:]
            dropped = min(skip_rows, len(rows))
            rows, skip_rows = rows[dropped:], skip_rows - dropped
            while len(rows):
                take = min(len(rows), chunk_rows - filled)
                parts.append((pool, rows[:take]))
                rows, filled = rows[take:], filled + take
                if filled == chunk_rows:
                    yield _chunk(parts, corrupt, b, in_process_worker)
                    parts, filled, corrupt = [], 0, 0
            pool = pool.take(rest)
            current, turn = upcoming, 1 - turn
        if parts or corrupt:
            yield _chunk(parts, corrupt, b, in_process_worker)
