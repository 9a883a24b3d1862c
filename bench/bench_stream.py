"""Streaming throughput of ShardStream against the raw sequential read of the same shard files.

    python bench/bench_stream.py                 # 28x28x1 and 32x32x3 uint8, 0/1/2 workers
    python bench/bench_stream.py --samples 40000 --batch 256 --url s3://bucket/bench

Prints a table (samples/s and the ratio to the raw read) and appends one JSON line to
bench/results/bench_stream.jsonl. "raw read" = every shard read start to end through the same
opener (fsspec/webdataset gopen) in 1 MiB blocks, bytes converted to samples; "tar iterate" =
webdataset's own tarfile_to_samples over the same files, no decoding (what a plain webdataset
pipeline could do at best). Streams hand over samples as stored (uint8), as the trainer gets them,
and the bench copies each batch once (as into a staging buffer for the device).

General path (``--formats png jpg``): the same shapes written as PNG or JPEG + cls by webdataset's
ShardWriter, no manifest, read by ShardStream through webdataset's decoders ("general stream"),
beside webdataset's own loader on the same files with the same decode (WebDataset -> shuffle ->
decode("pil") -> uint8 C x H x W -> batched, in a WebLoader with 0 or 2 worker processes). Warm
cache only: decoding, not the storage, is the cost there.

Two cache states, each row beside its own raw read:
- warm: the files are in the page cache, so "raw read" is a memory copy (tens of GB/s), the
  fastest any reader could possibly go;
- cold: every shard is evicted from the page cache (posix_fadvise DONTNEED) before each pass, so
  every row reads from the storage device, as a data set larger than memory is read. Local
  files only: with a --url that has a scheme (s3://...) the default is warm only, and cold is refused.
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
from data_pipeline.cli import nonnegative_int, positive_int  # noqa: E402
from data_pipeline.decode import DecodeSpec  # noqa: E402
from data_pipeline.shard_io import wds_gopen  # noqa: E402
from data_pipeline.shards import read_manifest, write_array_shards  # noqa: E402
from data_pipeline.stream import ShardStream, StreamPosition, manifest_from_urls  # noqa: E402


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


def image_like(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(n, H, W, C) uint8 with structure (4x4 blocks of noise, smoothed), so PNG and JPEG compress
    them about as they compress small natural images rather than storing incompressible noise."""
    c, h, w = shape
    coarse = np.random.default_rng(seed).integers(0, 256, size=(n, h // 4, w // 4, c)).astype(np.float32)
    fine = coarse.repeat(4, axis=1).repeat(4, axis=2)
    fine = (fine + np.roll(fine, 1, axis=1) + np.roll(fine, 1, axis=2) + np.roll(fine, 1, axis=(1, 2))) / 4
    return fine.astype(np.uint8)


def write_encoded_shards(folder: str, images: np.ndarray, fmt: str, per_shard: int) -> list[str]:
    import contextlib
    import io

    from PIL import Image

    pil_format = {"png": "PNG", "jpg": "JPEG"}[fmt]
    os.makedirs(folder, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), wds.ShardWriter(os.path.join(folder, "part-%06d.tar"),
                                                                    maxcount=per_shard) as sink:  # fmt: skip
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format=pil_format)
            sink.write({"__key__": f"{i:09d}", fmt: buf.getvalue(), "cls": i % 10})
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def bench_general(shape: tuple[int, ...], fmt: str, args, folder: str) -> list[dict]:
    """ShardStream's general path against webdataset's own loader, on the same encoded shards."""
    per_shard = max(args.general_samples // args.general_shards, 1)
    urls = write_encoded_shards(os.path.join(folder, f"{fmt}-{'x'.join(map(str, shape))}"),
                                image_like(args.general_samples, shape), fmt, per_shard)  # fmt: skip
    mode = "L" if shape[0] == 1 else "RGB"
    m = manifest_from_urls(urls, "bench", "train", DecodeSpec(image_key=fmt, image_mode=mode.lower()))
    staging = torch.empty((args.batch, *shape), dtype=torch.uint8)

    def chw(sample):
        image, label = sample
        a = np.asarray(image.convert(mode), dtype=np.uint8)
        return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), label

    def wds_loader(workers: int) -> int:
        dataset = (
            wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .shuffle(args.shuffle_buffer)
            .decode("pil")
            .to_tuple(fmt, "cls")
            .map(chw)
            .batched(args.batch, partial=False)
        )
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
        count = 0
        for x, _ in loader:
            staging.copy_(torch.as_tensor(x))
            count += len(x)
        return count

    def stream(workers: int, kind: str) -> int:
        s = ShardStream(m, 0, 1, args.batch, workers, shuffle_buffer=args.shuffle_buffer, seed=0, worker_type=kind)
        count = 0
        for b in s.epoch_batches(StreamPosition()):
            staging.copy_(b["x"])
            count += len(b["x"])
        return count

    rows = []
    runs = [(f"wds loader {w} worker(s)", lambda w=w: wds_loader(w)) for w in (0, 2)]
    # data.worker_type=auto (the default) reads these with processes; 2 threads shown beside them.
    runs += [(f"stream {w} worker(s), auto", lambda w=w: stream(w, "auto")) for w in args.workers]
    runs += [("stream 2 workers, thread", lambda: stream(2, "thread"))]
    for name, fn in runs:
        t, n = timed(fn, args.repeats)
        rows.append({"shape": list(shape), "cache": "warm", "mode": f"{fmt}: {name}", "samples_per_s": n / t})
    base = rows[1]["samples_per_s"]  # webdataset's loader with 2 workers
    for r in rows:
        r["ratio_to_wds_loader_2"] = r["samples_per_s"] / base
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=256_000)
    parser.add_argument("--shards", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--shuffle-buffer", type=nonnegative_int, default=2000)
    parser.add_argument("--workers", type=nonnegative_int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=positive_int, default=3, help="best of N timed passes")
    parser.add_argument(
        "--cache", nargs="+", choices=["warm", "cold"], help="page-cache states (default: warm cold; a --url's: warm)"
    )
    parser.add_argument("--url", default="", help="where to write the shards (default: a temp folder)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--formats", nargs="*", default=["png", "jpg"], choices=["png", "jpg"],
                        help="image formats for the general-path rows (none: fast path only)")  # fmt: skip
    parser.add_argument("--general-samples", type=positive_int, default=32_000)
    parser.add_argument("--general-shards", type=positive_int, default=16)
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help="the fast-path rows")
    args = parser.parse_args(argv)
    remote = "://" in args.url  # the cold pass evicts local files from the page cache (os.open)
    if args.cache is None:
        args.cache = ["warm"] if remote else ["warm", "cold"]
    elif remote and "cold" in args.cache:
        parser.error(f"--cache cold: evicting from the page cache needs local files, not --url {args.url}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file: give the folder the results file goes in")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    shapes = [(1, 28, 28), (3, 32, 32)]
    rows, general = [], []
    with tempfile.TemporaryDirectory() as folder:
        if args.fast:
            rows = [r for shape in shapes for r in bench_shape(shape, args, folder)]
        general = [r for fmt in args.formats for shape in shapes for r in bench_general(shape, fmt, args, folder)]
    if rows:
        print(f"{'shape':<10} {'cache':<6} {'mode':<20} {'samples/s':>12} {'x raw':>8}")
        for r in rows:
            print(
                f"{'x'.join(map(str, r['shape'])):<10} {r['cache']:<6} {r['mode']:<20} "
                f"{r['samples_per_s']:>12,.0f} {r['ratio_to_raw']:>8.3f}"
            )
    if general:
        print(f"\n{'shape':<10} {'mode':<34} {'samples/s':>12} {'x wds loader (2 workers)':>26}")
        for r in general:
            print(
                f"{'x'.join(map(str, r['shape'])):<10} {r['mode']:<34} {r['samples_per_s']:>12,.0f} "
                f"{r['ratio_to_wds_loader_2']:>26.3f}"
            )
    rows += general
    os.makedirs(args.out, exist_ok=True)
    record = {
        "bench": "stream", "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "args": vars(args), "rows": rows,
    }  # fmt: skip
    with open(os.path.join(args.out, "bench_stream.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
