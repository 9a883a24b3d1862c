"""Streaming throughput of ShardStream against the raw sequential read of the same shard files.

    python bench/bench_stream.py                 # 28x28x1 and 32x32x3 uint8, 0/1/2 workers
    python bench/bench_stream.py --samples 40000 --batch 256 --url s3://bucket/bench

Prints a table (samples/s and the ratio to the raw read) and appends one JSON line to
bench/results/bench_stream.jsonl. "raw read" = every shard read start to end through the same
opener (fsspec/webdataset gopen) in 1 MiB blocks, bytes converted to samples; "tar iterate" =
webdataset's own tarfile_to_samples over the same files, no decoding (what a plain webdataset
pipeline could do at best). The files are read once first, so all rows see a warm page cache.
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


def raw_read(urls: list[str]) -> int:
    total = 0
    for url in urls:
        with wds_gopen.gopen(url, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
    return total


def tar_iterate(urls: list[str]) -> int:
    return sum(1 for _ in wds.tarfile_to_samples()(iter([{"url": u} for u in urls])))


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
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
    raw_read(urls)  # warm the cache
    t_raw, nbytes = timed(lambda: raw_read(urls), args.repeats)
    raw_sps = n / t_raw
    rows = [
        {
            "shape": list(shape),
            "mode": "raw read",
            "samples_per_s": raw_sps,
            "MB_per_s": nbytes / t_raw / 1e6,
        }
    ]
    t_tar, count = timed(lambda: tar_iterate(urls), 1)
    rows.append({"shape": list(shape), "mode": "tar iterate (wds)", "samples_per_s": count / t_tar})
    for workers in args.workers:
        stream = ShardStream(m, 0, 1, args.batch, workers, shuffle_buffer=args.shuffle_buffer, seed=0)

        def run() -> int:
            return sum(len(b["key"]) for b in stream.epoch_batches(StreamPosition()))  # noqa: B023 (called at once)

        t, count = timed(run, args.repeats)
        rows.append(
            {
                "shape": list(shape),
                "mode": f"stream {workers} worker(s)",
                "samples_per_s": count / t,
            }
        )
    for r in rows:
        r["ratio_to_raw"] = r["samples_per_s"] / raw_sps
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed passes")
    parser.add_argument("--url", default="", help="where to write the shards (default: a temp folder)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = bench_shape((1, 28, 28), args, folder) + bench_shape((3, 32, 32), args, folder)
    print(f"{'shape':<10} {'mode':<20} {'samples/s':>12} {'x raw':>8}")
    for r in rows:
        print(
            f"{'x'.join(map(str, r['shape'])):<10} {r['mode']:<20} "
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
