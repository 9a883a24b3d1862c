"""Several epochs back to back, as the trainer reads them, with and without reading the next epoch
ahead (ShardStream(read_ahead=True), what the trainer uses): the wait for the first batch of each
epoch (the stall at an epoch start) and the wall time of the whole run.

    python bench/bench_epochs.py                       # PNG 28x28 shards (ShardWriter), 2 processes
    python bench/bench_epochs.py --format npy --kind thread --step-ms 2

The consumer sleeps --step-ms per batch, standing in for a training step on an accelerator (it
releases the CPU, as a GPU step mostly does). Both settings run alternately, --repeats times each,
in one process; the table shows medians and the ratio (read ahead / not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.bench_stream import image_like, write_encoded_shards  # noqa: E402
from data_pipeline.cli import int_between, nonnegative_float, nonnegative_int, positive_int  # noqa: E402
from data_pipeline.decode import DecodeSpec  # noqa: E402
from data_pipeline.shards import read_manifest, write_array_shards  # noqa: E402
from data_pipeline.stream import ShardStream, StreamPosition, manifest_from_urls  # noqa: E402


def run_epochs(manifest, args, read_ahead: bool) -> tuple[float, list[float]]:
    """Wall time of --epochs epochs and the wait for each epoch's first batch."""
    stream = ShardStream(
        manifest, 0, 1, args.batch, args.workers, shuffle_buffer=1000, worker_type=args.kind, read_ahead=read_ahead
    )
    first_waits = []
    start = time.perf_counter()
    try:
        for epoch in range(args.epochs):
            waited = time.perf_counter()
            for i, _ in enumerate(stream.epoch_batches(StreamPosition(epoch, 0))):
                if i == 0:
                    first_waits.append(time.perf_counter() - waited)
                time.sleep(args.step_ms / 1000)
    finally:
        stream.close()
    return time.perf_counter() - start, first_waits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["png", "jpg", "npy"], default="png", help="npy: this project's layout")
    parser.add_argument("--samples", type=positive_int, default=24_000)
    parser.add_argument("--shards", type=positive_int, default=8)
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--workers", type=nonnegative_int, default=2)
    parser.add_argument("--kind", choices=["auto", "thread", "process"], default="auto")
    parser.add_argument("--epochs", type=int_between(2, 10**6), default=4, help="at least 2: epoch 0, then later ones")
    parser.add_argument("--step-ms", type=nonnegative_float, default=20.0, help="the consumer's time per batch")
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args(argv)
    if args.shards > args.samples:
        parser.error(f"--shards {args.shards}: more shards than --samples {args.samples}")
    torch.set_num_threads(1)
    images = image_like(args.samples, (1, 28, 28))
    with tempfile.TemporaryDirectory() as folder:
        if args.format == "npy":
            write_array_shards(folder, "bench", "train", images, images[:, 0, 0, 0] % 10, args.shards)
            manifest = read_manifest(folder)
        else:
            urls = write_encoded_shards(folder, images, args.format, args.samples // args.shards)
            manifest = manifest_from_urls(urls, "bench", "train", DecodeSpec(image_key=args.format, image_mode="l"))
        results = {False: [], True: []}
        for _ in range(args.repeats):
            for read_ahead in (False, True):  # alternated: the machine's noise hits both alike
                results[read_ahead].append(run_epochs(manifest, args, read_ahead))
    print(
        f"{args.format} 28x28, {args.samples} samples in {args.shards} shards, batch {args.batch}, "
        f"{args.workers} {args.kind} worker(s), {args.epochs} epochs, {args.step_ms:g} ms per batch; "
        f"median of {args.repeats}"
    )
    print(f"{'':<16} {'wall s':>8} {'1st batch, epoch 0 (s)':>24} {'1st batch, later epochs (s)':>28}")
    medians = {}
    for read_ahead, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        first = statistics.median(r[1][0] for r in runs)
        later = statistics.median(w for r in runs for w in r[1][1:])
        medians[read_ahead] = (wall, later)
        print(f"{'read ahead' if read_ahead else 'no read-ahead':<16} {wall:>8.2f} {first:>24.3f} {later:>28.3f}")
    wall_ratio = medians[True][0] / medians[False][0]
    print(f"{'ratio':<16} {wall_ratio:>8.3f} {'':>24} {medians[True][1] / max(medians[False][1], 1e-9):>28.3f}")


if __name__ == "__main__":
    main()
