"""Converts data sets into WebDataset shards plus a manifest, at any fsspec URL.

    python -m data_pipeline.convert toy --dataset 25gaussians --out data/25gaussians
    python -m data_pipeline.convert --help
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.shards import Manifest, write_array_shards
from data_pipeline.toy import TOY_SPECS, sample_toy, toy_spec


def convert_toy(dataset: str, out: str, num_samples: int, num_shards: int, seed: int, std: float = 0.0) -> Manifest:
    points, modes = sample_toy(dataset, num_samples, seed, std)
    return write_array_shards(
        out, dataset, "train", points, modes, num_shards,
        source_checksum=f"synthetic:{dataset}:seed={seed}",
        preprocessing={"generator": "data_pipeline.toy.sample_toy", "seed": seed, "num_samples": num_samples,
                       "std": std or toy_spec(dataset).std},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    toy = sub.add_parser("toy", help="synthetic 2D data sets (25gaussians, 8gaussians, swissroll)")
    toy.add_argument("--dataset", choices=sorted(TOY_SPECS), default="25gaussians")
    toy.add_argument("--out", required=True, help="output folder: a path or any fsspec URL")
    toy.add_argument("--num-samples", type=int, default=102_400)
    toy.add_argument("--num-shards", type=int, default=8, help="a multiple of ranks x workers")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--std", type=float, default=0.0, help="per-mode std (default: the paper's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "toy":
        manifest = convert_toy(args.dataset, args.out, args.num_samples, args.num_shards, args.seed, args.std)
    print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
