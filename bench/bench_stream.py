"""Streaming throughput of ShardStream against the raw sequential read of the same shard files.

    python bench/bench_stream.py                 # 28x28x1 and 32x32x3 uint8, 0/1/2 workers
    python bench/bench_stream.py --samples 40000 --batch 256 --url s3://bucket/bench

Prints a table (samples/s and the ratio to the raw read) and appends one JSON line to
bench/results/bench_stream.jsonl. "raw read" = every shard read start to end through the same
opener (fsspec/webdataset gopen) in 1 MiB blocks, bytes converted to samples; "tar iterate" =
webdataset's own tarfile_to_samples over the same files, no decoding (what a plain webdataset
pipeline could do at best). Streams hand over samples as stored (uint8), as the trainer gets them,
and the bench copies each batch once (as into a staging buffer for the device).

Two cache states, each row beside its own raw read:
- warm: the files are in the page cache, so "raw read" is a memory copy (tens of GB/s), the
  fastest any reader could possibly go;
- cold: every shard is evicted from the page cache (posix_fadvise DONTNEED) before each pass, so
  every row reads from the storage device, as a data set larger than memory is read. Local
  files only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data_pipeline.shards import read_manifest, write_array_shards  # noqa: E402
from data_pipeline.stream import ShardStream, StreamPosition, wds_gopen  # noqa: E402


def evict(urls: list[str]) -> None:
    """Drops the files from the page cache (they are clean, so nothing is lost)."""
    for url in urls:
        fd = os.open(url, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(urls: list[str]) -> int:
    total = 0
    for url in urls:
        with wds_gopen.gopen(url, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
    return total


def tar_iterate(urls: list[str]) -> int:
    return sum(1 for _ in wds.tarfile_to_samples()(iter([{"url": u} for u in urls])))


def timed(fn, repeats: int, before=None) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_shape(shape: tuple[int, ...], args, folder: str) -> list[dict]:
    url = (
        args.url.rstrip("/") + "/" + "x".join(map(str, shape))
        if args.url
        else os.path.join(folder, "x".join(map(str, shape)))
    )
    x = np.random.default_rng(0).integers(0, 256, size=(args.samples, *shape), dtype=np.uint8)
    write_array_shards(url, "bench", "train", x, np.arange(args.samples) % 10, args.shards)
    m = read_manifest(url)
    urls, n = m.shard_urls(), m.num_samples
    rows = []
    for cache in args.cache:
        before = (lambda: evict(urls)) if cache == "cold" else (lambda: raw_read(urls))

        def row(mode: str, fn, repeats: int, samples=None, cache=cache, before=before) -> dict:
            t, out = timed(fn, repeats, before)
            return {"shape": list(shape), "cache": cache, "mode": mode, "samples_per_s": (samples or out) / t}

        raw = row("raw read", lambda: raw_read(urls), args.repeats, samples=n)
        raw["MB_per_s"] = raw["samples_per_s"] * m.shards[0].num_bytes / m.shards[0].num_samples / 1e6
        rows.append(raw)
        rows.append(row("tar iterate (wds)", lambda: tar_iterate(urls), 1))
        for workers in args.workers:
            stream = ShardStream(m, 0, 1, args.batch, workers, shuffle_buffer=args.shuffle_buffer, seed=0)

            def run() -> int:
                # Each batch is copied once, as into a pinned buffer for the device: it is read for real.
                staging, count = torch.empty((args.batch, *shape), dtype=torch.uint8), 0
                for b in stream.epoch_batches(StreamPosition()):  # noqa: B023 (called at once)
                    staging.copy_(b["x"])
                    count += len(b["x"])
                return count

            rows.append(row(f"stream {workers} worker(s)", run, args.repeats))
        for r in rows:
            if r["cache"] == cache:
                r["ratio_to_raw"] = r["samples_per_s"] / raw["samples_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed passes")
    parser.add_argument("--cache", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--url", default="", help="where to write the shards (default: a temp folder)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = bench_shape((1, 28, 28), args, folder) + bench_shape((3, 32, 32), args, folder)
    print(f"{'shape':<10} {'cache':<6} {'mode':<20} {'samples/s':>12} {'x raw':>8}")
    for r in rows:
        print(
            f"{'x'.join(map(str, r['shape'])):<10} {r['cache']:<6} {r['mode']:<20} "
            f"{r['samples_per_s']:>12,.0f} {r['ratio_to_raw']:>8.3f}"
        )
    os.makedirs(args.out, exist_ok=True)
    record = {
        "bench": "stream", "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "args": vars(args), "rows": rows,
    }  # fmt: skip
    with open(os.path.join(args.out, "bench_stream.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
