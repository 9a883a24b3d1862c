"""Streams a manifest's shards: split by rank and worker, seeded, resumable.

How every rank gets the same number of batches: the shard list is shuffled with (seed, epoch),
identically on every rank; rank r takes shards r, r + world, ...; its worker w takes every W-th of
those. From the manifest's sample counts each rank computes how many full batches every worker of
every rank will produce, and an epoch is the smallest per-rank total, so no rank waits at the end
of an epoch for a batch another rank does not have. With equal shards whose size is a multiple of
the per-rank batch size (the converters' default), nothing is dropped and every sample of an epoch
is seen exactly once across ranks x workers.

Inside a worker each shard is read whole (local files into reused buffers, anything else through
webdataset's opener table, which sends every remote scheme to fsspec: shard_io.py), parsed into
arrays (shard_reader.py), mixed into a shuffle pool with a generator seeded by (seed, epoch, rank,
worker), and cut into batches. Workers hand over chunks of ``chunk_batches`` consecutive batches
(about 8 MiB); batches hold samples as stored, and the consumer decodes them on its device
(decode_samples). Workers are threads (the default: numpy runs outside the GIL and nothing is
copied between processes) or DataLoader processes (chunks travel in shared memory), run by
reader_pool.py.

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

import dataclasses
import logging
import random
import shlex
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.cli import ConfigError
from data_pipeline.config import DECODE_FLAGS, DEFAULT_MAX_SAMPLE_BYTES, WORKER_TYPES, StreamPosition
from data_pipeline.decode import DecodeSpec, is_meg_layout
from data_pipeline.reader_pool import ChunkReaders, Pin, passing_on_user_errors, pinned, start_readers
from data_pipeline.shard_io import (
    ReadBuffer,
    expected_samples,
    load_shard,
    parse_any_shard,
    prefetch_hint,
    read_shard_bytes,
)
from data_pipeline.shard_reader import CorruptShard, SampleTooLarge, ShardArrays
from data_pipeline.shards import DataError, Manifest, ShardInfo, looks_like_shards, read_manifest

log = logging.getLogger(__name__)


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
            raise DataError(
                f"shard {url} is unreadable ({e}): a data set read whole (an evaluation's test split, a tool's "
                "--data) has no shard to spare, unlike training: convert the data again"
            ) from None
        total += len(parts[-1])
    arrays = ShardArrays.concat(parts).take(slice(0, limit))
    # np.array copies: x may be a read-only view into a shard's bytes, and float32 is not converted.
    x = decode_samples(torch.from_numpy(np.array(arrays.x)), manifest.dtype)
    return {"x": x, "label": arrays.labels, "key": arrays.keys}


def split_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern (``data/x-{000000..000015}.tar``), several joined by ``::``
    (webdataset's convention), or a list."""
    if isinstance(urls, str):
        try:
            urls = [u for part in urls.split("::") for u in braceexpand.braceexpand(part.strip()) if part.strip()]
        except braceexpand.UnbalancedBracesError:
            raise DataError(
                f"{urls!r} has unbalanced braces: a shard pattern looks like data/x-{{000000..000015}}.tar"
            ) from None
    return [local_file_path(u) for u in urls]


def local_file_path(url: str) -> str:
    """A ``file:`` URL as the path it names (percent-decoded, as pathlib's as_uri() encodes a space), so
    that every reader opens one file: webdataset's decoded it, the size check and the fast reader
    took ``%20`` literally. Other URLs unchanged."""
    if not url.startswith("file:"):
        return url
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def manifest_from_urls(
    urls: str | list[str],
    name: str = "",
    split: str = "train",
    spec: DecodeSpec | None = None,
    max_sample_bytes: int = 0,
) -> Manifest:
    """A manifest for shards named by a pattern or a list, built by reading every shard once (sample
    counts, sizes, sample shape). The first shard's layout picks the parser: this project's own, or
    webdataset's decoders with ``spec`` (default: DecodeSpec()). Damaged shards stop it, naming them."""
    urls = split_urls(urls)
    if not urls:
        raise DataError("no shard URLs")
    spec = spec or DecodeSpec()
    shards, shape, dtype, counts, layout, left_out = [], None, None, Counter(), None, Counter()
    for url in urls:
        try:
            data = read_shard_bytes(url)
        except FileNotFoundError:
            raise DataError(f"shard {url} does not exist") from None
        if layout is None:
            layout = "meg" if is_meg_layout(data, max_sample_bytes or DEFAULT_MAX_SAMPLE_BYTES) else "webdataset"
        try:
            arrays = parse_any_shard(data, layout, spec, max_sample_bytes)
        except SampleTooLarge as e:
            raise DataError(f"shard {url}: {e}") from None
        except CorruptShard as e:
            raise DataError(
                f"shard {url} is unreadable: {e} (the reader expects {expected_samples(layout, spec)})"
            ) from None
        if shape is None:
            shape, dtype = list(arrays.x.shape[1:]), str(arrays.x.dtype)
        elif shape != list(arrays.x.shape[1:]) or dtype != str(arrays.x.dtype):
            raise DataError(
                f"shard {url} holds {list(arrays.x.shape[1:])} {arrays.x.dtype}, the first held {shape} {dtype}"
                + ("; set data.image_size to give every image one size" if layout == "webdataset" else "")
            )
        for label, c in zip(*np.unique(arrays.labels, return_counts=True), strict=True):
            counts[str(label)] += int(c)
        shards.append(ShardInfo(url, len(arrays), len(data)))
        left_out += arrays.left_out
    if left_out:  # half a data set of .png and .gif trained on the .png half without a word
        kinds = ", ".join(f"{n} with {held}" for held, n in left_out.most_common(3))
        log.warning(
            "%d samples of the shards are left out, as they have no %s member (%s): set data.image_key "
            "(meg-convert: --image-key) to the member that holds their image, e.g. data.image_key='png;gif'",
            left_out.total(), " / ".join(f".{k}" for k in [*spec.keys, "npy"]), kinds,
        )  # fmt: skip
    decode = spec.to_json() if layout == "webdataset" else {}
    layout = layout or "meg"
    return Manifest(
        name or "shards", split, shape or [], dtype or "", shards, dict(counts), layout=layout, decode=decode,
        max_sample_bytes=max_sample_bytes,
    )  # fmt: skip


def open_data(url: str, spec: DecodeSpec, max_sample_bytes: int = 0) -> Manifest:
    """The data set ``data.url`` names: a folder with manifest.json or the manifest itself (read and
    checked), or shards (a pattern, a list, a tar file, a command; indexed here by reading each once)."""
    if not looks_like_shards(url):
        manifest = read_manifest(url)
        manifest.max_sample_bytes = max_sample_bytes
        if manifest.layout == "webdataset":
            check_decode_settings(manifest, spec, url)
        return manifest
    urls = split_urls(url)
    log.info("indexing %d shard(s) of %s: every shard is read once before training "
             "(python -m data_pipeline.convert index writes a manifest to skip this)", len(urls), url)  # fmt: skip
    return manifest_from_urls(urls, spec=spec, max_sample_bytes=max_sample_bytes)


def check_decode_settings(manifest: Manifest, spec: DecodeSpec, url: str) -> None:
    """Raises DataError where a run asks to decode indexed shards otherwise than their manifest does (the
    manifest's way is the one read: the run's data.image_mode=l came out as RGB, without a word). Only the
    settings the run changed from the defaults are its own request."""
    recorded, default = DecodeSpec(**manifest.decode), DecodeSpec()
    differ = [
        f.name
        for f in dataclasses.fields(DecodeSpec)
        if getattr(spec, f.name) != getattr(default, f.name) and getattr(spec, f.name) != getattr(recorded, f.name)
    ]
    if differ:
        asked = ", ".join(f"data.{n}={getattr(spec, n)!r}" for n in differ)
        indexed = ", ".join(f"{n}={getattr(recorded, n)!r}" for n in differ)
        flags = " ".join(f"{DECODE_FLAGS['data.' + n]} {shlex.quote(str(getattr(spec, n)))}" for n in differ)
        raise DataError(
            f"{asked}, but the manifest at {url} decodes its shards with {indexed}, as they were indexed: index them "
            f"again with those settings (python -m data_pipeline.convert index ... {flags}), or drop the override"
        )


# What a worker hands over is a chunk of several consecutive batches: one message per batch cost
# more than all the parsing. From a worker process the samples travel as a torch tensor in shared
# memory (its fixed cost per message is amortised over the chunk) and the small labels and keys
# are pickled; from a worker thread nothing is copied.
CHUNK_BYTES = 8 << 20
WARN_FIRST = 3  # corrupt shards named one by one per worker and epoch, before the rest are only counted
MAX_CHUNK_BATCHES = 64


def _chunk(
    parts: list[tuple[ShardArrays, np.ndarray]], corrupt: int, batch_size: int, shared: bool, first_error: str = ""
) -> dict:
    """The chunk made of ``rows`` of each ``(pool, rows)`` part, in order; ``corrupt`` shards were
    skipped before it, the first of them for ``first_error``."""
    n = sum(len(rows) for _, rows in parts)
    if not parts:  # only corrupt shards to report
        return {"x": torch.empty(0), "label": np.zeros(0, np.int64), "key": np.zeros(0, str), "batches": 0,
                "corrupt_shards": corrupt, "first_error": first_error}  # fmt: skip
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
        "first_error": first_error,
    }


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
        worker_type: str = "auto",
        max_corrupt_share: float = 1.0,
        read_ahead: bool = False,
        pin: Pin | None = None,
    ):
        if len(manifest.shards) < world_size * max(num_workers, 1):
            raise ConfigError(
                f"{manifest.name}: {len(manifest.shards)} shards cannot feed {world_size} ranks x "
                f"{max(num_workers, 1)} workers; write more shards or use fewer workers"
            )
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker type {worker_type!r}: choose one of {', '.join(WORKER_TYPES)}")
        if worker_type == "auto":
            # This project's shards parse as numpy on whole shards, outside the GIL: threads. Other
            # tools' shards go through webdataset's tar iterator and per-image decoders, Python
            # that holds the GIL: processes (2 threads read them slower than 1; 2 processes ~1.9x).
            worker_type = "process" if manifest.layout == "webdataset" else "thread"
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of {world_size}, batch size {batch_size}")
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.num_workers, self.worker_type = batch_size, num_workers, worker_type
        self.shuffle_buffer, self.seed, self.max_corrupt_share = shuffle_buffer, seed, max_corrupt_share
        sample_bytes = int(np.prod(manifest.sample_shape, dtype=np.int64)) * np.dtype(manifest.dtype).itemsize
        self.chunk_batches = chunk_batches or max(1, min(MAX_CHUNK_BATCHES, CHUNK_BYTES // (batch_size * sample_bytes)))
        self._unreported_corrupt = 0  # counted in a chunk without batches; goes with the next batch
        # read_ahead: the next epoch's readers start once this one's have handed over their last
        # chunk (no stall at each epoch start). They hold this stream, so whoever asks for it
        # calls close() when done. (epoch, readers) until that epoch is read.
        self.read_ahead = read_ahead
        # pin: e.g. Tensor.pin_memory for a CUDA trainer, applied on the reader threads (from
        # pageable memory a non_blocking copy to the device is a synchronous one).
        self.pin = pin
        self._opened: tuple[int, ChunkReaders | None] | None = None
        self.urls = manifest.shard_urls()
        self.counts = [s.num_samples for s in manifest.shards]
        if self.batches_per_epoch(0) == 0:
            raise ConfigError(
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

    def epoch_batches(
        self, position: StreamPosition, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[dict]:
        """Yields the rest of ``position.epoch`` from ``position.batches_done`` on (it does not
        advance ``position``: the trainer does, once a batch is consumed). Each batch holds ``x``
        (as stored, e.g. uint8: see decode_samples), ``label`` (int64), ``key`` (a numpy array of
        the samples' keys) and ``corrupt_shards`` (shards skipped since the previous batch).

        Raises DataError when a whole epoch gives no batch, or more than ``max_corrupt_share`` of the
        rank's shards of the epoch were corrupt (naming the first and what the reader expected), so
        a data set that cannot be read is never looped over; StopRequested when ``should_stop()``
        turns true while workers are awaited."""
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
        readers = self._take_opened(epoch) if resume_round == 0 else None
        if readers is None:
            self.close()  # readers opened ahead for another epoch or position
            readers = self._open_readers(epoch, skips)
        # Read in the trainer's thread between its steps without workers.
        chunks = (
            readers.chunks(should_stop)
            if readers
            else pinned(_EpochDataset(self, epoch, skips).worker_chunks(0), self.pin)
        )
        i, yielded, corrupt, first_error = round_start, 0, 0, ""
        try:
            for chunk in chunks:
                # This epoch's readers are done (or its last round of chunks is here) while the chunks
                # they handed over are still to be used: the next epoch's start reading now, not after.
                # (Not for an epoch that gave nothing yet: it is about to fail.)
                near_end = readers and yielded and (readers.finished or total - i <= per_chunk * len(counts))
                if near_end and self._opened is None and self.read_ahead:
                    self._opened = (epoch + 1, self._open_readers(epoch + 1, [0] * len(counts)))
                self._unreported_corrupt += chunk["corrupt_shards"]
                corrupt += chunk["corrupt_shards"]
                first_error = first_error or chunk["first_error"]
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
                        yielded += 1
                    i += 1
        finally:
            # Closed here, so that the readers stop when the epoch is left (a stop, a return), not
            # whenever the collector gets to the generator.
            if readers:
                readers.close()
        shards = sum(len(w) for w in self._assignment(epoch, self.rank))
        if (yielded == 0 and done == 0) or corrupt > self.max_corrupt_share * shards:
            expected = expected_samples(self.manifest.layout, DecodeSpec(**self.manifest.decode))
            raise DataError(
                f"{self.manifest.name}: epoch {epoch} gave rank {self.rank} {yielded} batch(es); {corrupt} of its "
                f"{shards} shard(s) were unreadable (data.max_corrupt_share={self.max_corrupt_share:g}). The first: "
                f"{first_error or '(none: too few samples for a batch)'}. The reader expects {expected}."
            )

    def _open_readers(self, epoch: int, skips: list[int]) -> ChunkReaders | None:
        """Reader threads (or a DataLoader's processes) already reading ``epoch``; None without workers."""
        if self.num_workers == 0:
            return None
        dataset = _EpochDataset(self, epoch, skips)
        return start_readers(dataset, self.num_workers, self.worker_type, self.seed + epoch, self.pin)

    def _take_opened(self, epoch: int) -> ChunkReaders | None:
        """The readers opened ahead for the start of ``epoch``, if those are what was opened."""
        if self._opened is None or self._opened[0] != epoch:
            return None
        readers, self._opened = self._opened[1], None
        return readers

    def close(self) -> None:
        """Stops the readers of an epoch opened ahead (the run ends, or reads elsewhere)."""
        if self._opened is not None:
            _, readers = self._opened
            self._opened = None
            if readers:
                readers.close()


class _EpochDataset(IterableDataset):
    def __init__(self, stream: ShardStream, epoch: int, skips: list[int]):
        self.stream, self.epoch, self.skips = stream, epoch, skips

    def __iter__(self) -> Iterator[dict]:  # in a DataLoader process, or in the consumer (0 workers)
        info = get_worker_info()
        if info is None:
            return self.worker_chunks(0)
        return passing_on_user_errors(self.worker_chunks(info.id, in_process_worker=True))

    def worker_chunks(self, worker: int, in_process_worker: bool = False) -> Iterator[dict]:
        """Worker ``worker``'s chunks of this epoch, in order."""
        s = self.stream
        rng = np.random.default_rng([s.seed, self.epoch, s.rank, worker])
        keep = s.shuffle_buffer if s.shuffle_buffer > 1 else 0
        b, chunk_rows = s.batch_size, s.chunk_batches * s.batch_size
        skip_rows, corrupt, first_error, warned = self.skips[worker] * b, 0, "", 0
        parts: list[tuple[ShardArrays, np.ndarray]] = []  # (pool, rows of it) of the chunk being built
        filled = 0
        mine = s._assignment(self.epoch, s.rank)[worker]
        remaining = iter(range(len(mine)))
        # Two read buffers take turns: the shard being cut into chunks, and the one read ahead.
        buffers = (ReadBuffer(), ReadBuffer())

        def next_good_shard(buffer: ReadBuffer) -> ShardArrays | None:
            nonlocal corrupt, first_error, warned
            for k in remaining:
                i = mine[k]
                if k + 1 < len(mine):  # the storage reads the next shard while this one is parsed
                    prefetch_hint(s.urls[mine[k + 1]])
                try:
                    return load_shard(s.urls[i], s.manifest.shards[i], s.manifest, buffer)
                except CorruptShard as e:
                    corrupt += 1
                    first_error = first_error or f"{s.urls[i]}: {e}"
                    warned += 1
                    # The first few are named; after that one line per hundred, not one per shard.
                    if warned <= WARN_FIRST or warned % 100 == 0:
                        more = (
                            "" if warned < WARN_FIRST else f" ({warned} skipped by this worker; the rest are counted)"
                        )
                        log.warning("skipping corrupt shard %s: %s%s", s.urls[i], e, more)
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
                    yield _chunk(parts, corrupt, b, in_process_worker, first_error)
                    parts, filled, corrupt, first_error = [], 0, 0, ""
            pool = pool.take(rest)
            current, turn = upcoming, 1 - turn
        if parts or corrupt:
            yield _chunk(parts, corrupt, b, in_process_worker, first_error)
