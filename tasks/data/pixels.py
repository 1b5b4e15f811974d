"""Pixel statistics and normalisation: uint8 images in the stored format -> a model's input.

``ChannelStats`` (per-channel mean and std of the train split, on the [0, 1]
scale) is what prepare writes to ``stats.json`` and every model carries;
``normalise`` applies it. This module imports only numpy, so the MLflow model
can ship it (with ``images``) and normalise a served image exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation on the [0, 1] scale."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: np.ndarray, chunk: int = 4096) -> ChannelStats:
        """Statistics of uint8 NHWC images, accumulated in float64 chunks to bound memory."""
        accumulator = StatsAccumulator(images.shape[-1])
        for start in range(0, len(images), chunk):
            accumulator.add(images[start : start + chunk])
        return accumulator.result()


class StatsAccumulator:
    """Running per-channel sums of uint8 NHWC blocks, for statistics of a streamed split.

    Sums are exact integers, taken a few rows at a time: a float64 copy of a
    whole block of 64x64 RGB images would cost 8x the block's memory.
    """

    ROWS = 256

    def __init__(self, channels: int):
        self.total = np.zeros(channels, dtype=np.int64)
        self.total_sq = np.zeros(channels, dtype=np.int64)
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        for start in range(0, len(block), self.ROWS):
            values = np.asarray(block[start : start + self.ROWS]).reshape(-1, len(self.total))
            wide = values.astype(np.int64)
            self.total += wide.sum(axis=0)
            self.total_sq += np.square(wide).sum(axis=0)
            self.count += len(wide)

    def result(self) -> ChannelStats:
        if not self.count:
            raise ValueError("no images to take channel statistics from")
        mean = self.total / (self.count * 255.0)
        mean_sq = self.total_sq / (self.count * 255.0**2)
        std = np.sqrt(np.maximum(mean_sq - np.square(mean), 0.0))
        # A constant channel would divide by zero at normalisation time.
        std = np.where(std < 1e-6, 1.0, std)
        return ChannelStats(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def normalise(images: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 channels-first, standardised with train stats."""
    mean = np.asarray(stats.mean, dtype=np.float32)
    std = np.asarray(stats.std, dtype=np.float32)
    scaled = (np.asarray(images, dtype=np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))
