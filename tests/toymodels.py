"""A tiny CNN trained in seconds on data whose class sits in one corner, for explanation tests."""

from __future__ import annotations

import torch

from tasks.models import build_model


def corner_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise; class 1 has a bright 5x5 patch in the top-left corner, class 0 does not."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 16, 16, generator=generator) * 0.5
    labels = torch.arange(n) % 2
    images[labels == 1, :, :5, :5] += 3.0
    return images, labels


def trained_corner_model(steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", 1, 2, 8, 0.0)
    images, labels = corner_data(256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()
