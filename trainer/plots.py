"""PNG figures people would rather look at than read: 2D scatters, energy landscapes, image grids."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

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
    with write_replacing(path, binary=True) as f:  # a link at path is replaced, not followed
        fig.savefig(f, format="png")
    plt.close(fig)


@torch.no_grad()
def energy_landscape(
    path: str, energy, lim: float, title: str, temperature: float = 1.0, resolution: int = 200
) -> None:
    """exp(-E / temperature) on a grid, normalised over the grid: the density the generator targets
    (MEG's generator minimises E(G(z)) - w * H, so its target is p ∝ exp(-E / w))."""
    axis = torch.linspace(-lim, lim, resolution)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    device = next(energy.parameters()).device
    e = torch.cat([energy(chunk.to(device)).float().cpu() for chunk in grid.split(8192)])
    density = torch.softmax(-e / temperature, dim=0).reshape(resolution, resolution).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=120)
    axes[0].imshow(density, extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
    label = "exp(-E) / Z" if temperature == 1.0 else f"exp(-E / {temperature:g}) / Z (entropy weight {temperature:g})"
    axes[0].set_title(f"density {label}", fontsize=9)
    im = axes[1].imshow(
        e.reshape(resolution, resolution).numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma"
    )
    axes[1].set_title("energy E(x)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with write_replacing(path, binary=True) as f:  # a link at path is replaced, not followed
        fig.savefig(f, format="png")
    plt.close(fig)


def image_grid(path: str, images: torch.Tensor, nrow: int = 8) -> None:
    """Images in [-1, 1], shape (N, C, H, W) with C in {1, 3}, saved as one PNG grid."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    if c not in (1, 3):
        # StackedMNIST-style stacks with more channels: show the first three as RGB.
        images = images[:, :3] if c > 3 else images[:, :1]
        c = images.shape[1]
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    with write_replacing(path, binary=True) as f:
        Image.fromarray(array[:, :, 0] if c == 1 else array).save(f, format="PNG")
