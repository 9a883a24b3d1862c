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
"""

from __future__ import annotations

import importlib
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import Manifest

log = logging.getLogger(__name__)

# webdataset's package re-exports the gopen *function* under the module's name.
wds_gopen = importlib.import_module("webdataset.gopen")

# Schemes that webdataset would otherwise route to curl/aws binaries or reject: send them to fsspec.
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "memory", "http", "https", "az", "abfs", "hdfs", "sftp", "ftp")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
    return fsspec.open(url, mode, block_size=max(bufsize, 1 << 20)).open()


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


class CorruptShardCounter:
    """A webdataset error handler: warns naming the shard, counts, and lets the stream go on."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping unreadable data: %s", exn)
        return True


def decode_sample(sample: dict, dtype: str) -> tuple[np.ndarray, int, str]:
    x = np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False)
    if dtype == "uint8":
        x = x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32, copy=False), int(sample["cls"]), sample["__key__"]


def _collate(samples: list[tuple[np.ndarray, int, str]]) -> dict:
    xs, labels, keys = zip(*samples)
    return {"x": torch.from_numpy(np.stack(xs)), "label": torch.tensor(labels), "key": list(keys)}


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
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.urls = manifest.shard_urls()
        self.counts = [s.num_samples for s in manifest.shards]

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
        advance ``position``: the trainer does, once a batch is consumed)."""
        epoch, done = position.epoch, position.batches_done
        total = self.batches_per_epoch(epoch)
        counts = self._worker_batch_counts(epoch, self.rank)
        # The DataLoader takes batches from its workers round-robin, skipping exhausted ones, and
        # always starts a new iterator at worker 0: workers skip the whole rounds already done,
        # and the few batches of a partly consumed round are dropped here.
        order = [(r, w) for r in range(max(counts, default=0)) for w in range(len(counts)) if r < counts[w]]
        round_start = done
        if done < len(order):
            round_start = next(i for i, (r, _) in enumerate(order) if r == order[done][0])
        skips = [sum(1 for _, w in order[:round_start] if w == worker) for worker in range(len(counts))]
        # Its own generator: creating an iterator otherwise draws from the global torch RNG, which
        # would shift the trainer's noise whenever an epoch starts or a run resumes.
        loader = DataLoader(_EpochDataset(self, epoch, skips), batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed + epoch))
        for i, batch in enumerate(loader, start=round_start):
            if i >= total:
                break
            if i >= done:
                yield batch


class _EpochDataset(IterableDataset):
    def __init__(self, stream: ShardStream, epoch: int, skips: list[int]):
        self.stream, self.epoch, self.skips = stream, epoch, skips

    def __iter__(self) -> Iterator[dict]:
        s = self.stream
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = s._assignment(self.epoch, s.rank)[worker]
        rng = random.Random(hash((s.seed, self.epoch, s.rank, worker)))
        on_error = CorruptShardCounter()
        samples = wds.tarfile_to_samples(handler=on_error)(iter([{"url": s.urls[i]} for i in shards]))
        if s.shuffle_buffer > 1:
            samples = wds.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng)(samples)
        dtype = s.manifest.dtype
        batch: list = []
        skip = self.skips[worker]
        reported = 0
        for sample in samples:
            batch.append(decode_sample(sample, dtype))
            if len(batch) == s.batch_size:
                if skip > 0:
                    skip -= 1
                else:
                    out = _collate(batch)
                    out["corrupt_shards"] = on_error.count - reported
                    reported = on_error.count
                    yield out
                batch = []
