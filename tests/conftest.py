"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tasks.data.datasets import PreparedData, Split
from tasks.data.pixels import ChannelStats
from tasks.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]

# Prefect servers started by tests would try to send telemetry; there is no network here.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: without it they are skipped, saying so (CI has no GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- unit-test fixtures ---

TINY_CLASSES = 10
TINY_SIZE = 8  # 8x8 grayscale: the size of sklearn's digits, small enough for any test


def _tiny_split(rng: np.random.Generator, per_class: int) -> Split:
    labels = np.repeat(np.arange(TINY_CLASSES), per_class)
    # Each class has its own brightness plus noise: learnable, and no channel is constant.
    base = (10 + 25 * labels)[:, None, None, None]
    noise = rng.integers(-8, 9, size=(len(labels), TINY_SIZE, TINY_SIZE, 1))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Split(images=images, labels=labels.astype(np.int64))


@pytest.fixture(scope="session")
def params() -> Params:
    """The real params.yaml, validated (frozen, so one copy serves the whole session)."""
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def tiny_prepared() -> PreparedData:
    """In-memory PreparedData: 10 classes, 8x8x1 uint8, 3/2/2 images per class."""
    rng = np.random.default_rng(0)
    train, val, test = (_tiny_split(rng, n) for n in (3, 2, 2))
    return PreparedData(
        train=train,
        val=val,
        test=test,
        classes=tuple(str(i) for i in range(TINY_CLASSES)),
        stats=ChannelStats.of(train.images),
    )
