"""The on-disk format of prepared data, written by ``prepare`` and read by every later stage.

::

    data/prepared/
      train/images.npy   uint8 (N, H, W, C), memory-mapped on read
      train/labels.npy   int64 (N,)
      val/...  test/...
      classes.json       ["0", "1", ...] (index = label)
      stats.json         per-channel mean/std of the TRAIN split, on the [0, 1] scale
    data/resampled/
      indices.npy              int64 rows of the prepared train split, repeats allowed
      synthetic/images.npy     uint8 images made by SMOTE-like samplers (may be empty)
      synthetic/labels.npy

Arrays are memory-mapped on read: a stage touches only the pages it uses, so a
100k-image split costs address space, not resident memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.artifacts import read_json, write_json, write_npy
from tasks.layout import PREPARED_DIR, RESAMPLED_DIR

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation on the [0, 1] scale."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: np.ndarray, chunk: int = 4096) -> ChannelStats:
        """Statistics of uint8 NHWC images, accumulated in float64 chunks to bound memory."""
        channels = images.shape[-1]
        total = np.zeros(channels)
        total_sq = np.zeros(channels)
        count = 0
        for start in range(0, len(images), chunk):
            block = np.asarray(images[start : start + chunk], dtype=np.float64) / 255.0
            total += block.sum(axis=(0, 1, 2))
            total_sq += np.square(block).sum(axis=(0, 1, 2))
            count += block.shape[0] * block.shape[1] * block.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
        # A constant channel would divide by zero at normalisation time.
        std = np.where(std < 1e-6, 1.0, std)
        return cls(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class PreparedData:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    stats: ChannelStats

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every stored image."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def write_split(directory: Path, split: Split) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_npy(directory / "images.npy", np.ascontiguousarray(split.images, dtype=np.uint8))
    write_npy(directory / "labels.npy", np.asarray(split.labels, dtype=np.int64))


def read_split(directory: Path) -> Split:
    return Split(
        images=np.load(directory / "images.npy", mmap_mode="r"),
        labels=np.load(directory / "labels.npy"),
    )


def write_prepared(
    directory: Path, splits: dict[str, Split], classes: tuple[str, ...], stats: ChannelStats
) -> None:
    for name in SPLITS:
        write_split(directory / name, splits[name])
    write_json(directory / "classes.json", list(classes))
    write_json(directory / "stats.json", {"mean": stats.mean, "std": stats.std})


def load_prepared(directory: Path = PREPARED_DIR) -> PreparedData:
    """Open the prepare stage's output (arrays memory-mapped)."""
    if not (directory / "classes.json").is_file():
        raise FileNotFoundError(f"{directory} holds no prepared data: run `dvc repro prepare`")
    stats = read_json(directory / "stats.json")
    return PreparedData(
        **{name: read_split(directory / name) for name in SPLITS},
        classes=tuple(read_json(directory / "classes.json")),
        stats=ChannelStats(mean=tuple(stats["mean"]), std=tuple(stats["std"])),
    )


def load_resampled_train(prepared: PreparedData, directory: Path = RESAMPLED_DIR) -> Split:
    """The train split as the resample stage left it: chosen rows plus synthetic images."""
    indices = np.load(directory / "indices.npy")
    synthetic = read_split(directory / "synthetic")
    # Fancy indexing copies the rows out of the memory map; the train split is
    # the one set every epoch reads in full, so holding it is the right trade.
    images = np.concatenate([prepared.train.images[indices], synthetic.images])
    labels = np.concatenate([prepared.train.labels[indices], synthetic.labels])
    return Split(images=images, labels=labels)
