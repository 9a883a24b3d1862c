"""A small MNIST digit classifier, used to label each channel of StackedMNIST samples."""

from __future__ import annotations

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Conv(32) -> Conv(64) -> pool -> Conv(128) -> pool -> MLP; input (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(128 * 7 * 7, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def classify_stacked(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Mode ids of stacked digit images (N, n_stack, 28, 28): channel 0 is the most significant digit."""
    n, stack = images.shape[:2]
    digits = torch.cat(
        [classifier(chunk.reshape(-1, 1, 28, 28)).argmax(1) for chunk in images.split(batch_size)]
    ).reshape(n, stack)
    weights = 10 ** torch.arange(stack - 1, -1, -1, device=digits.device)
    return (digits * weights).sum(1)
