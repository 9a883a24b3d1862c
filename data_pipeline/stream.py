"""Streams a manifest's shards through webdataset: split by rank and worker, seeded, resumable.

How every rank gets the same number of batches: the shard list is shuffled with (seed, epoch),
identically on every rank; rank r takes shards r, r + world, ...; its worker w takes every W-th of
those. From the manifest's sample counts each rank computes how many full batches every worker of
every rank will produce, and an epoch is the smallest per-rank total, so no rank waits at the end
of an epoch for a batch another rank does not have. With equal shards whose size is a multiple of
the per-rank batch size (the converters' default), nothing is dropped and every sample of an epoch
is seen exactly once across ranks x workers.

Resuming: within an epoch the order of batches is a pure function of (seed, epoch, rank), and the
DataLoader hands out worker batches round-robin, so a position is just (epoch, batches consumed).

Inside a worker each shard is read whole (one request through webdataset's opener table, which
sends every remote scheme to fsspec), parsed into arrays (shard_reader.py), mixed into a shuffle pool
with a generator seeded by (seed, epoch, rank, worker), and cut into batches that are decoded
(uint8 -> [-1, 1] float32) in the worker. A shard that is truncated, corrupt or of another size than
the manifest records is skipped with a warning naming it and counted in the next batch's
``corrupt_shards``; that worker then yields fewer batches, and that rank ends its epoch early (the
trainer's loop goes straight on to the next epoch, so no rank waits on another). Samples whose
shape or dtype differ from the manifest raise DataError: the manifest does not describe the data.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

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


def register_fsspec_opener() -> None:
    """Makes webdataset open every non-local URL through fsspec (idempotent)."""
    for scheme in FSSPEC_SCHEMES:
        wds_gopen.gopen_schemes[scheme] = _fsspec_gopen


register_fsspec_opener()


@dataclass
class StreamPosition:
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch already consumed by the trainer

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


def read_shard_bytes(url: str) -> bytes:
    """One shard's bytes through webdataset's opener table (local paths, pipe:, and fsspec)."""
    with wds_gopen.gopen(url, "rb") as f:
        return f.read()


def load_shard(url: str, info: ShardInfo, manifest: Manifest) -> ShardArrays:
    """Reads and parses one shard; CorruptShard if it is damaged, DataError if its samples are not
    what the manifest describes."""
    try:
        data = read_shard_bytes(url)
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


def to_float(x: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype == "uint8":
        return t.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)
    return t.to(torch.float32)


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
    return {"x": to_float(arrays.x, manifest.dtype), "label": arrays.labels, "key": arrays.keys}


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


def _batch(arrays: ShardArrays, corrupt: int) -> dict:
    """What a worker sends: numpy arrays in their stored dtype. Pickled through the worker's pipe
    they cost one copy; torch tensors would each go through a fresh shared-memory segment, which
    measured 2-3 ms per batch here, more than all the parsing."""
    return {
        "x": np.ascontiguousarray(arrays.x),
        "label": np.ascontiguousarray(arrays.labels),
        "key": arrays.keys,
        "corrupt_shards": corrupt,
    }


def _finish(batch: dict, dtype: str) -> dict:
    """In the consuming process: float32 samples ([-1, 1] for uint8), tensors, a list of keys."""
    batch["x"] = to_float(batch["x"], dtype)
    batch["label"] = torch.from_numpy(batch["label"])
    batch["key"] = batch["key"].tolist()
    return batch


def _no_collate(batch: dict) -> dict:
    return batch


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
    ):
        if len(manifest.shards) < world_size * max(num_workers, 1):
            raise ValueError(
                f"{manifest.name}: {len(manifest.shards)} shards cannot feed {world_size} ranks x "
                f"{max(num_workers, 1)} workers; write more shards or use fewer workers"
            )
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of {world_size}, batch size {batch_size}")
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
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
        (float32), ``label``, ``key`` (the samples' keys) and ``corrupt_shards`` (shards skipped
        since this worker's previous batch)."""
        epoch, done = position.epoch, position.batches_done
        total = self.batches_per_epoch(epoch)
        counts = self._worker_batch_counts(epoch, self.rank)
        # The DataLoader takes batches from its workers round-robin, skipping exhausted ones, and
        # always starts a new iterator at worker 0: workers skip the whole rounds already done,
        # and the few batches of a partly consumed round are dropped here.
        order = [(r, w) for r in range(max(counts, default=0)) for w in range(len(counts)) if r < counts[w]]
        round_start = min(done, len(order))
        if done < len(order):
            round_start = next(i for i, (r, _) in enumerate(order) if r == order[done][0])
        skips = [sum(1 for _, w in order[:round_start] if w == worker) for worker in range(len(counts))]
        # Its own generator: creating an iterator otherwise draws from the global torch RNG, which
        # would shift the trainer's noise whenever an epoch starts or a run resumes.
        loader = DataLoader(
            _EpochDataset(self, epoch, skips),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_no_collate,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        for i, batch in enumerate(loader, start=round_start):
            if i >= total:
                break
            if i >= done:
                yield _finish(batch, self.manifest.dtype)


class _EpochDataset(IterableDataset):
    def __init__(self, stream: ShardStream, epoch: int, skips: list[int]):
        self.stream, self.epoch, self.skips = stream, epoch, skips

    def _shards(self, shards: list[int]) -> Iterator[ShardArrays | None]:
        s = self.stream
        for i in shards:
            try:
                yield load_shard(s.urls[i], s.manifest.shards[i], s.manifest)
            except CorruptShard as e:
                log.warning("skipping corrupt shard %s: %s", s.urls[i], e)
                yield None

    def __iter__(self) -> Iterator[dict]:
        s = self.stream
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = s._assignment(self.epoch, s.rank)[worker]
        rng = np.random.default_rng([s.seed, self.epoch, s.rank, worker])
        keep = s.shuffle_buffer if s.shuffle_buffer > 1 else 0
        b = s.batch_size
        skip, corrupt = self.skips[worker], 0
        pool: ShardArrays | None = None
        loaded = self._shards(shards)
        # One shard is read ahead, so that a corrupt shard is counted in the batches of the shard
        # before it (a worker's last batches would otherwise have none to report it in).
        pending = next(loaded, _END)
        while pending is not _END:
            current, pending = pending, next(loaded, _END)
            if current is None:
                corrupt += 1
                continue
            pool = current if pool is None else ShardArrays.concat([pool, current])
            if keep:
                pool = pool.take(rng.permutation(len(pool)))
            floor = keep if pending is not _END else 0
            while len(pool) - b >= floor:
                head, pool = pool.take(slice(0, b)), pool.take(slice(b, None))
                if skip > 0:
                    skip -= 1
                    continue
                yield _batch(head, corrupt)
                corrupt = 0


_END = object()
