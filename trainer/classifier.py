"""Trains the digit classifier that StackedMNIST evaluation uses, on real MNIST digits.

    python -m trainer.classifier --data data/mnist-test --data data/mnist-5k --out classifiers/mnist.pt

The digits of every ``--data`` split are pooled and split 85/15 (seeded); the held-out accuracy
is printed and stored in the checkpoint next to the weights. Light augmentation (random shifts of
up to 2 pixels) makes up for the small set of real digits that can be had offline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.cli import (
    CheckpointError,
    DataError,
    add_debug_flag,
    check_output_file,
    nonnegative_int,
    positive_int,
    run_tool,
    short_message,
)
from models.classifier import DigitClassifier
from trainer.nofollow import write_replacing
from trainer.progress import Progress


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    holdout: float = 0.15,
    log=print,
) -> tuple[DigitClassifier, float]:
    g = torch.Generator().manual_seed(seed)  # on the CPU: it draws indices and shifts, wherever x is
    order = torch.randperm(len(x), generator=g).to(x.device)
    n_test = int(len(x) * holdout)
    test, train = order[:n_test], order[n_test:]
    if len(train) < batch_size:
        raise DataError(
            f"{len(x)} digits leave {len(train)} to train on after the {holdout:.0%} held out, fewer than one "
            f"batch of {batch_size}: give more --data"
        )
    torch.manual_seed(seed)
    model = DigitClassifier().to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    start, progress = time.time(), Progress("classifier training", steps, "steps")
    for epoch in range(epochs):
        model.train()
        perm = train[torch.randperm(len(train), generator=g).to(x.device)]
        for i in range(len(perm) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], 2, g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.advance()
        accuracy = evaluate_accuracy(model, x[test], y[test])
        log(
            f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {accuracy:.4f} "
            f"({time.time() - start:.0f} s)"
        )
    return model, accuracy


@torch.no_grad()
def evaluate_accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1024)])
    return float((predictions == y).float().mean())


def load_classifier(path: str) -> DigitClassifier:
    """The classifier ``python -m trainer.classifier`` wrote to ``path``; anything else is a DataError
    naming the file (a file holding objects other than tensors and numbers is not unpickled)."""
    from trainer.checkpoint import load_tensors

    make = "make one with python -m trainer.classifier --data <MNIST data set folder> --out <path>"
    try:
        state = load_tensors(path, map_location="cpu")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {make}") from None
    model = DigitClassifier()
    try:
        model.load_state_dict(state["weights"])
    except (KeyError, TypeError, IndexError, RuntimeError) as e:
        raise DataError(
            f"{path} is not a digit classifier checkpoint ({type(e).__name__}: "
            f"{short_message(' '.join(str(e).split()), 120)}); {make}"
        ) from None
    return model.eval()


DIGITS = [str(digit) for digit in range(10)]


def check_digits(labels: set[str], data: list[str]) -> None:
    """Refuses data whose labels (as strings) are not the digits 0..9, every one of them: a digit missing
    from the training is one the classifier never predicts, and StackedMNIST's modes hit would miss it."""
    sets = f"--data {data[0]} holds" if len(data) == 1 else f"the {len(data)} --data sets hold"
    others = sorted(labels - set(DIGITS), key=lambda label: (len(label), label))
    if others:
        raise DataError(f"the classifier needs digits labelled 0..9; {sets} labels {', '.join(others[:12])}")
    missing = [digit for digit in DIGITS if digit not in labels]
    if missing:
        raise DataError(
            f"{sets} no {', '.join(missing)}: the classifier would never predict "
            f"{'it' if len(missing) == 1 else 'them'}; add --data with every digit 0..9 (e.g. MNIST's test set)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.classifier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", action="append", required=True, help="an MNIST data set, its folder or manifest URL (repeatable)"
    )
    parser.add_argument("--out", required=True, help="checkpoint path (.pt)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="passes over the data (default: %(default)s)")
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="initialisation, split and batch order (default: %(default)s)"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_tool(lambda: _train(args), args.debug)


def _train(args: argparse.Namespace) -> int:
    from data_pipeline.shards import manifest_url, read_manifest
    from data_pipeline.stream import read_split

    check_output_file(args.out, "--out", {".pt": "torch", ".pth": "torch"})
    given: dict[str, str] = {}
    for url in args.data:  # one set twice lands in both parts: the held-out accuracy would flatter
        murl = manifest_url(url)  # by the manifest each names: a folder and its manifest.json are one set
        first = given.setdefault(murl if "://" in murl else os.path.realpath(murl), url)
        if first != url or args.data.count(url) > 1:
            raise DataError(f"--data {first} and --data {url} are one data set: give each once")
    manifests = [read_manifest(url) for url in args.data]
    for url, manifest in zip(args.data, manifests):  # each set's shape from its manifest, before any reading
        if tuple(manifest.sample_shape) != (1, 28, 28):
            raise DataError(
                f"the classifier takes (1, 28, 28) digits; --data {url} holds {tuple(manifest.sample_shape)}"
            )
    # The digits each set holds, as its manifest records them (every converter does): said before any reading.
    if all(isinstance(manifest.class_counts, dict) and manifest.class_counts for manifest in manifests):
        held = {label for manifest in manifests for label, count in manifest.class_counts.items() if count}
        check_digits(held, args.data)
    # The folder next: a missing one (the README's classifiers/) must not cost the training.
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    splits = [read_split(manifest) for manifest in manifests]
    x = torch.cat([s["x"] for s in splits])
    y = torch.from_numpy(np.concatenate([s["label"] for s in splits]))
    check_digits({str(label) for label in y.unique().tolist()}, args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, accuracy = train_classifier(x.to(device), y.to(device), args.epochs, args.seed)
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    with write_replacing(args.out, binary=True) as f:
        torch.save({"weights": weights, "heldout_accuracy": accuracy, "num_digits": len(x)}, f)
    print(f"held-out accuracy {accuracy:.4f} on {int(len(x) * 0.15)} digits; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
