"""Toy 2D data sets of the MEG paper, with their mode centres and spread (method.md, "Toy 2D").

25 Gaussians: centres on {-4, -2, 0, 2, 4}^2, std 0.05, everything divided by 2.828.
8 Gaussians: centres on a circle of radius 2, std 0.02, everything divided by 1.414.
Swiss roll: sklearn's 2D roll scaled by 1/7.5; it has no modes, so mode metrics do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ToySpec:
    name: str
    centres: np.ndarray | None  # (modes, 2), None for continuous data
    std: float  # per-coordinate std of each mode, after scaling


def _grid25() -> ToySpec:
    scale = 2.828
    grid = np.array([(x, y) for x in range(-4, 5, 2) for y in range(-4, 5, 2)], dtype=np.float64)
    return ToySpec("25gaussians", grid / scale, 0.05 / scale)


def _ring8() -> ToySpec:
    scale = 1.414
    angles = [2 * math.pi * k / 8 for k in range(8)]
    ring = np.array([(2 * math.cos(a), 2 * math.sin(a)) for a in angles])
    return ToySpec("8gaussians", ring / scale, 0.02 / scale)


# Presets round a data set's std to six digits (0.017680 for 0.05 / 2.828): stds this close are one std.
STD_TOLERANCE = 1e-3


def same_std(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=STD_TOLERANCE)


TOY_SPECS = {"25gaussians": _grid25(), "8gaussians": _ring8(), "swissroll": ToySpec("swissroll", None, 0.0)}


def toy_spec(name: str) -> ToySpec:
    if name not in TOY_SPECS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(TOY_SPECS)}")
    return TOY_SPECS[name]


def sample_toy(name: str, n: int, seed: int, std: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n points (float32, shape (n, 2)) and their mode index (-1 for the swiss roll), seeded.

    ``std`` > 0 replaces the data set's published per-mode std."""
    rng = np.random.default_rng(seed)
    spec = toy_spec(name)
    if std > 0:
        spec = ToySpec(spec.name, spec.centres, std)
    if spec.centres is None:
        t = 1.5 * math.pi * (1 + 2 * rng.random(n))
        points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + 0.25 * rng.standard_normal((n, 2))
        return (points / 7.5).astype(np.float32), np.full(n, -1, dtype=np.int64)
    modes = rng.integers(0, len(spec.centres), size=n)
    points = spec.centres[modes] + spec.std * rng.standard_normal((n, 2))
    return points.astype(np.float32), modes.astype(np.int64)


def true_log_density(points: np.ndarray, spec: ToySpec) -> np.ndarray:
    """log p(x) of the mixture itself (equal weights, isotropic Gaussians), float64."""
    if spec.centres is None:
        raise ValueError(f"{spec.name} has no closed-form density")
    sq = ((points[:, None, :].astype(np.float64) - spec.centres[None]) ** 2).sum(axis=2)
    log_components = -sq / (2 * spec.std**2) - np.log(2 * math.pi * spec.std**2)
    peak = log_components.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(log_components - peak).mean(axis=1, keepdims=True)))[:, 0]


def mode_metrics(samples: np.ndarray, spec: ToySpec, min_count: int = 20) -> dict[str, float]:
    """VEEGAN/PacGAN protocol: a sample is high quality within 3 std of its nearest centre.

    Returns the high-quality share, modes with >= 1 high-quality sample (the lax count), modes
    with >= ``min_count`` (the useful count) and PacGAN's reverse KL: KL(histogram of the
    high-quality samples' modes || uniform), in nats (NaN when no sample is high quality).
    """
    if spec.centres is None:
        raise ValueError(f"{spec.name} has no modes; mode metrics do not apply")
    dist = np.linalg.norm(samples[:, None, :] - spec.centres[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    high_quality = dist[np.arange(len(samples)), nearest] <= 3 * spec.std
    counts = np.bincount(nearest[high_quality], minlength=len(spec.centres))
    share = counts / counts.sum() if counts.sum() else None
    kl = float((share[share > 0] * np.log(share[share > 0] * len(counts))).sum()) if share is not None else math.nan
    return {
        "high_quality_share": float(high_quality.mean()),
        "modes_hit": int((counts >= 1).sum()),
        f"modes_with_{min_count}": int((counts >= min_count).sum()),
        "num_modes": len(spec.centres),
        "mode_kl_reverse": kl,
    }
