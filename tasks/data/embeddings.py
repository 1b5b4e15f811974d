"""Image embeddings for neighbour-based resampling (``resample.space: embeddings``).

SMOTE-like samplers interpolate between an image and one of its nearest
neighbours. In pixel space "nearest" means "overlapping pixels", which is a
poor notion of similarity for images; in a CNN's feature space neighbours
share content. Two embedders:

- a trained teacher's penultimate layer (``resample.embedding_checkpoint``),
  the better one when a checkpoint from an earlier run is at hand;
- otherwise a fixed, seeded random-projection CNN: random convolutions with
  ReLU and pooling preserve local structure well enough to rank neighbours
  (the idea behind random-feature CNN baselines), and need no training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.checkpoints import load_checkpoint
from tasks.data.pixels import ChannelStats, normalise


class RandomProjectionCNN(nn.Module):
    """Three random conv-ReLU-pool layers and a 2x2 average pool: 256 features, seeded."""

    def __init__(self, in_channels: int, seed: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        generator = torch.Generator().manual_seed(seed)
        for module in self.body:
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * 9
                with torch.no_grad():
                    module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                    module.bias.zero_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PenultimateLayer(nn.Module):
    """A trained classifier without its head: pooled features (before dropout and linear)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.features = classifier.features
        self.pool = classifier.pool
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_embedder(checkpoint: Path | None, in_channels: int, seed: int) -> nn.Module:
    """The teacher's penultimate layer if a checkpoint is given, else the random CNN."""
    if checkpoint is None:
        return RandomProjectionCNN(in_channels, seed)
    teacher = load_checkpoint(checkpoint)
    if teacher.in_channels != in_channels:
        raise ValueError(
            f"resample.embedding_checkpoint {checkpoint} takes {teacher.in_channels}-channel "
            f"images; the prepared data has {in_channels}"
        )
    return PenultimateLayer(teacher.build())


@torch.no_grad()
def embed(
    images: np.ndarray, stats: ChannelStats, model: nn.Module, batch_size: int = 512
) -> np.ndarray:
    """uint8 NHWC images -> float64 (N, features), standardised per feature."""
    chunks = [
        model(torch.from_numpy(normalise(images[start : start + batch_size], stats))).double()
        for start in range(0, len(images), batch_size)
    ]
    features = torch.cat(chunks).numpy()
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
