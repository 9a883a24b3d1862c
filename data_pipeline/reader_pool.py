"""The reader pool: reader threads, or a DataLoader's worker processes, that read an epoch's chunks
ahead of the consumer and hand them over in the DataLoader's order, pinned when asked.

Thread workers share the consumer's memory, so a chunk costs nothing to hand over; the work in a
worker is numpy on whole shards and file reads, which release the GIL, so threads run in parallel.
Process workers (a DataLoader) isolate the reading but pay for every byte they send, and end with
the process that started them.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline.cli import UserError
from data_pipeline.storage import StopRequested, stop_on, stop_signalled

# A chunk that carries a worker process's UserError instead of samples (see passing_on_user_errors).
WORKER_ERROR = "worker_error"

# e.g. Tensor.pin_memory for a CUDA trainer: each chunk's samples are copied into page-locked
# memory on the thread that reads them, so the trainer's copies to the device run asynchronously.
Pin = Callable[[torch.Tensor], torch.Tensor]

_DONE = object()
READER_JOIN_SECONDS = 5.0


def start_readers(
    dataset: IterableDataset, num_workers: int, worker_type: str, seed: int, pin: Pin | None
) -> ChunkReaders:
    """``num_workers`` threads (``worker_type`` "thread") or DataLoader processes already reading
    ``dataset``, whose ``worker_chunks(w)`` are worker w's chunks in order; ``seed`` seeds the
    DataLoader's own generator."""
    if worker_type == "thread":
        return ChunkReaders([partial(_pinned_source, pin, dataset.worker_chunks, w) for w in range(num_workers)])
    # Its own generator: creating an iterator otherwise draws from the global torch RNG, which
    # would shift the trainer's noise whenever an epoch starts or a run resumes.
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_no_collate,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=partial(end_with_parent, os.getpid()),
    )
    return ChunkReaders([partial(_pinned_source, pin, _loader_chunks, loader)])


def pinned(chunks: Iterator[dict], pin: Pin | None) -> Iterator[dict]:
    """``chunks`` with their samples pinned, closed with it (see _loader_chunks)."""
    if pin is None:
        return chunks
    return _pin_each(chunks, pin)


def _pinned_source(pin: Pin | None, source: Callable[..., Iterator[dict]], *args) -> Iterator[dict]:
    return pinned(source(*args), pin)


def _no_collate(batch: dict) -> dict:
    return batch


def _read_into(source: Callable[[], Iterator[dict]], out: queue.Queue, stop: threading.Event, finished) -> None:
    """A reader thread: ``source``'s chunks into ``out`` until it ends (then _DONE) or fails (then its
    error); gives up when ``stop`` is set."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    chunks = source()
    try:
        with stop_on(stop):  # its storage waits end when its readers are closed
            for chunk in chunks:
                if not put(chunk):
                    return
    except BaseException as e:  # noqa: BLE001 (handed to the consumer, which raises it)
        finished.set()
        put(e)
        return
    finally:
        chunks.close()  # now, on this thread: see _loader_chunks
    finished.set()
    put(_DONE)


def end_with_parent(parent: int, worker: int = 0) -> None:
    """In a worker process: end (SIGKILL) when the process that started it ends, however it ends, so
    that a killed trainer leaves no workers behind (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def passing_on_user_errors(chunks: Iterator[dict]) -> Iterator[dict]:
    """A worker process's ``chunks``, a UserError among them handed on as a chunk (WORKER_ERROR), raised
    as it was by _loader_chunks: the DataLoader re-raises a worker's error with its traceback in the
    message, which reached the user as a traceback for a mistake of theirs (a shard gone, too large)."""
    try:
        yield from chunks
    except UserError as e:
        yield {WORKER_ERROR: e}


def _loader_chunks(loader: DataLoader) -> Iterator[dict]:
    """A DataLoader's chunks; its worker processes are shut down when this ends (exhausted, failed
    or stopped). Left to the garbage collector (an error's traceback keeps the iterator in a
    cycle), the shutdown, up to 5 s of joins, ran on whichever thread collected it: another
    epoch's reader, which then missed its own stop deadline."""
    iterator = iter(loader)
    try:
        for chunk in iterator:
            if WORKER_ERROR in chunk:
                raise chunk[WORKER_ERROR]
            yield chunk
    finally:
        iterator._shutdown_workers()  # what its __del__ does; torch offers no public close


def _pin_each(chunks: Iterator[dict], pin: Pin) -> Iterator[dict]:
    try:
        for chunk in chunks:
            yield {**chunk, "x": pin(chunk["x"])} if chunk["batches"] else chunk
    finally:
        chunks.close()


class ChunkReaders:
    """The chunks of ``sources``, each read on its own thread from the moment this is made, in the
    order a DataLoader gives its workers' chunks: round-robin, skipping exhausted ones.
    ``finished`` turns true once every source has handed over its last chunk: the next epoch may
    start reading then, while the consumer still works through the chunks it was handed."""

    def __init__(self, sources: list[Callable[[], Iterator[dict]]], prefetch: int = 2):
        self.queues = [queue.Queue(maxsize=prefetch) for _ in sources]
        self.stop = threading.Event()
        self.finished_sources = [threading.Event() for _ in sources]
        self.threads = [
            threading.Thread(
                target=_read_into, args=(source, q, self.stop, done), name=f"shard-reader-{w}", daemon=True
            )
            for w, (source, q, done) in enumerate(zip(sources, self.queues, self.finished_sources))
        ]
        for t in self.threads:
            t.start()

    @property
    def finished(self) -> bool:
        return all(done.is_set() for done in self.finished_sources)

    def chunks(self, should_stop: Callable[[], bool]) -> Iterator[dict]:
        """The chunks in order. A source's error is raised here; so is StopRequested when
        ``should_stop()`` turns true while a chunk is awaited (slow storage, a hanging command): the
        trainer's thread only ever waits on a queue, so a stop signal is always heard."""
        active = list(range(len(self.queues)))
        while active:
            for worker in list(active):
                while True:
                    try:
                        item = self.queues[worker].get(timeout=0.2)
                        break
                    except queue.Empty:
                        if should_stop():
                            raise StopRequested from None
                if item is _DONE:
                    active.remove(worker)
                elif isinstance(item, BaseException):
                    if should_stop() or stop_signalled():  # e.g. Slurm's SIGTERM to the job step ended a pipe:
                        raise StopRequested from item
                    raise item
                else:
                    yield item

    def close(self) -> None:
        self.stop.set()
        # A reader blocked in a read (a hanging command, a stalled store) must not hold up a stop:
        # the threads are daemons, so one still blocked at exit is simply dropped.
        deadline = time.monotonic() + READER_JOIN_SECONDS
        for t in self.threads:
            if t is not threading.current_thread():  # the readers may be collected on a reader thread
                t.join(max(deadline - time.monotonic(), 0))
