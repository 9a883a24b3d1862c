"""Figures people would rather look at than read (PNG, or PDF or SVG by the path's suffix): 2D scatters,
energy landscapes (the density on a log scale), image grids of samples beside real images, and a run's
loss curves from metrics.jsonl."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from data_pipeline.cli import FIGURE_FORMATS  # noqa: E402
from trainer.nofollow import write_replacing  # noqa: E402


def scatter_2d(path: str, samples: np.ndarray, data: np.ndarray | None, title: str, lim: float) -> None:
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=2, c="tab:gray", alpha=0.3, label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:red", alpha=0.6, label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    _save(fig, path)


@torch.no_grad()
def energy_landscape(
    path: str, energy, lim: float, title: str, temperature: float = 1.0, resolution: int = 200, decades: float = 4.0
) -> None:
    """The density exp(-E / temperature) / Z per unit area on a grid (log colour scale over ``decades``
    decades below its peak: a near-uniform density and a peaked one look different), and E itself.
    MEG's generator minimises E(G(z)) - w * H, so its target is p ∝ exp(-E / w)."""
    axis = torch.linspace(-lim, lim, resolution)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    device = next(energy.parameters()).device
    e = torch.cat([energy(chunk.to(device)).float().cpu() for chunk in grid.split(8192)])
    cell_area = (2 * lim / (resolution - 1)) ** 2
    density = (torch.softmax(-e.double() / temperature, dim=0) / cell_area).reshape(resolution, resolution).numpy()
    peak = float(density.max())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120)
    norm = LogNorm(vmin=peak * 10**-decades, vmax=peak)
    im = axes[0].imshow(
        np.maximum(density, norm.vmin), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis", norm=norm
    )
    t = "" if temperature == 1.0 else f" / {temperature:g}"
    axes[0].set_title(f"density exp(-E{t}) / Z (log scale)", fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04, label="density per unit area")
    im = axes[1].imshow(
        e.reshape(resolution, resolution).numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma"
    )
    axes[1].set_title("energy E(x)", fontsize=10)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="E")
    for ax in axes:
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    note = f" (T = {temperature:g}, the entropy weight)" if temperature != 1.0 else " (T = 1)"
    fig.suptitle(title + note, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    figure_format = FIGURE_FORMATS[os.path.splitext(path)[1].lower() or ".png"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # meg-sample --out new/folder/s.png
    with write_replacing(path, binary=True) as f:  # a link at path is replaced, not followed
        fig.savefig(f, format=figure_format)
    plt.close(fig)


def _grid_array(images: torch.Tensor, nrow: int) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W), as one uint8 (rows, cols, C) mosaic with 2-pixel gaps."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    if c not in (1, 3):
        # StackedMNIST-style stacks with more channels: show the first three as RGB.
        images = images[:, :3] if c > 3 else images[:, :1]
        c = images.shape[1]
    nrow = min(nrow, n)
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def image_grid(
    path: str, images: torch.Tensor, nrow: int = 8, real: torch.Tensor | None = None, caption: str = ""
) -> None:
    """Images in [-1, 1], (N, C, H, W) with C in {1, 3} (more: the first three as RGB), as a PNG grid
    at least 2 screen pixels per image pixel and 600 px a panel; ``real`` images (as many) to their left."""
    panels = [("real images", real), ("samples", images)] if real is not None and len(real) else [("samples", images)]
    arrays = [(name, _grid_array(x, nrow)) for name, x in panels]
    height, width = arrays[-1][1].shape[:2]
    dpi, panel_in = 100, max(6.0, 2 * width / 100)
    fig, axes = plt.subplots(1, len(arrays), figsize=(panel_in * len(arrays), panel_in * height / width + 0.9), dpi=dpi)
    for ax, (name, array) in zip(np.atleast_1d(axes), arrays, strict=True):
        gray = array.shape[2] == 1
        ax.imshow(
            array[:, :, 0] if gray else array, cmap="gray" if gray else None, vmin=0, vmax=255, interpolation="nearest"
        )
        ax.set_title(name, fontsize=11)
        ax.axis("off")
    if caption:
        fig.suptitle(caption, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


# The loss-curve figure: (title, metrics.jsonl keys, log scale).
CURVES = (
    ("losses", ("energy_loss", "generator_loss"), False),
    ("energy gap E(fake) - E(real)", ("energy_gap",), False),
    ("gradient penalty", ("penalty",), True),
    ("MI estimate (flat: the generator collapsed)", ("mi_estimate",), False),
    ("sample spread (std of G(z) per dimension)", ("sample_spread",), False),
)
EVAL_SHARES = ("high_quality_share", "energy_f1", "energy_auroc", "energy_auprc", "auprc", "auroc")


# Lines of metrics.jsonl after which training goes on from their step: a process's start (or resume)
# and a divergence rollback's. Lines logged before them at a later step are of training that no
# checkpoint kept (a process killed past its last checkpoint, a diverged stretch), logged again after.
RESTARTS = ("start", "rollback")


def curve_rows(metrics_path: str) -> list[dict]:
    """The rows of a run's metrics.jsonl that its curves show: each that parses and has a step, less
    those a later restart (RESTARTS) took back."""
    rows = []
    with open(metrics_path, "rb") as f:  # bytes: a line that is not UTF-8 spoils that line alone
        for line in f:
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):  # a line being written, or a damaged one
                    continue
                if isinstance(row, dict) and _finite(row.get("step")):  # a damaged line may still parse: 42
                    if row.get("event") in RESTARTS:
                        rows = [r for r in rows if r["step"] <= row["step"]]
                    rows.append(row)
    return rows


def loss_curves(path: str, metrics_path: str, title: str = "") -> None:
    """A run's curves from its metrics.jsonl: losses, energy gap, penalty (log), MI estimate, sample
    spread, and the evaluations' shares (0-1) against the step."""
    rows = curve_rows(metrics_path)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=100)
    for ax, (name, keys, log) in zip(axes.flat, CURVES):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), label=key, linewidth=1)
        ax.set_title(name, fontsize=10)
        if log and ax.lines and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
    ax = axes.flat[-1]
    for key in EVAL_SHARES:
        for prefix in ("eval_", "eval_mala_"):
            points = [(r["step"], r[prefix + key]) for r in rows if _finite(r.get(prefix + key))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=(prefix + key).removeprefix("eval_"))
    ax.set_ylim(0, 1.02)
    ax.set_title("evaluation (shares)", fontsize=10)
    steps = [r["step"] for r in rows if _finite(r.get("step"))]
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if steps:
            ax.set_xlim(0, max(steps) * 1.02)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title or "training curves", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
