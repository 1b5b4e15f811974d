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
      weights.npy              float64 sampling weight per resampled row (balanced_sampler)
      synthetic/images.npy     uint8 images made by SMOTE-like samplers (may be empty)
      synthetic/labels.npy

Arrays are memory-mapped on read: a stage touches only the pages it uses, so a
100k-image split costs address space, not resident memory. ``NpyWriter``
streams rows into a ``.npy`` file so that writing one never needs it in memory
either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import read_json, write_json, write_npy
from tasks.data.pixels import ChannelStats
from tasks.layout import PREPARED_DIR, RESAMPLED_DIR

SPLITS = ("train", "val", "test")


class NpyWriter:
    """Write a ``.npy`` file of known shape by appending rows; nothing is held in memory.

    ``np.save`` needs the whole array; this writes the header for the final shape
    and then each block as it comes, and checks at ``close`` that every row arrived.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8):
        self.path = Path(path)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "wb")  # noqa: SIM115 -- closed by close()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(self.handle, header)
        self.offset = self.handle.tell()

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: block {block.shape} does not fit {self.shape}")
        self.handle.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self.handle.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} promised")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.handle.close()


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8) -> int:
    """An all-zero ``.npy`` of ``shape`` (sparse on disk); returns the data's byte offset."""
    writer = NpyWriter(path, shape, dtype)
    writer.handle.truncate(writer.offset + int(np.prod(shape)) * writer.dtype.itemsize)
    writer.handle.close()
    return writer.offset


class Rows:
    """Rows of a (memory-mapped) array picked by index, then extra in-memory rows.

    The resampled train split is the prepared train split's rows by index (repeats
    allowed) plus synthetic images; this view reads a row from the memory map only
    when the DataLoader asks for it, instead of copying the split into memory.
    """

    def __init__(self, base: np.ndarray, indices: np.ndarray, extra: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.extra = extra

    def __len__(self) -> int:
        return len(self.indices) + len(self.extra)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        if index < len(self.indices):
            return np.asarray(self.base[self.indices[index]])
        return self.extra[index - len(self.indices)]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Many rows at once, in order, as one in-memory array (a DataLoader batch)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and not (-len(self) <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of {len(self)}")
        rows = rows % len(self)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        base = rows < len(self.indices)
        out[base] = self.base[self.indices[rows[base]]]
        out[~base] = self.extra[rows[~base] - len(self.indices)]
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        rows = np.concatenate([self.base[self.indices], self.extra])
        return rows if dtype is None else rows.astype(dtype)


def take_rows(images: np.ndarray | Rows, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` as one in-memory array, for an array, a memory map or a Rows view."""
    if isinstance(images, Rows):
        return images.take(rows)
    return np.asarray(images[np.asarray(rows, dtype=np.int64)])


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
    preprocessing: dict[str, Any] | None = None  # ImageSpec.preprocessing() of the images

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
    directory: Path,
    splits: dict[str, Split],
    classes: tuple[str, ...],
    stats: ChannelStats,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    for name in SPLITS:
        write_split(directory / name, splits[name])
    write_description(directory, classes, stats, preprocessing)


def write_description(
    directory: Path,
    classes: tuple[str, ...],
    stats: ChannelStats,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """``classes.json``, ``stats.json`` and ``preprocessing.json``: what the label
    indices, the pixel scale and the stored images mean (``ImageSpec.preprocessing``)."""
    write_json(directory / "classes.json", list(classes))
    write_json(directory / "stats.json", {"mean": stats.mean, "std": stats.std})
    if preprocessing is not None:
        write_json(directory / "preprocessing.json", preprocessing)


def load_prepared(directory: Path = PREPARED_DIR) -> PreparedData:
    """Open the prepare stage's output (arrays memory-mapped)."""
    if not (directory / "classes.json").is_file():
        raise FileNotFoundError(f"{directory} holds no prepared data: run `dvc repro prepare`")
    stats = read_json(directory / "stats.json")
    preprocessing = directory / "preprocessing.json"
    return PreparedData(
        **{name: read_split(directory / name) for name in SPLITS},
        classes=tuple(read_json(directory / "classes.json")),
        stats=ChannelStats(mean=tuple(stats["mean"]), std=tuple(stats["std"])),
        preprocessing=read_json(preprocessing) if preprocessing.is_file() else None,
    )


def load_resampled_train(prepared: PreparedData, directory: Path = RESAMPLED_DIR) -> Split:
    """The train split as the resample stage left it: chosen rows plus synthetic images.

    The images are a ``Rows`` view on the memory-mapped train split, so a
    100k-image split is read page by page as the DataLoader asks for it.
    """
    indices = np.load(directory / "indices.npy")
    synthetic = read_split(directory / "synthetic")
    images = Rows(prepared.train.images, indices, np.asarray(synthetic.images))
    labels = np.concatenate([prepared.train.labels[indices], synthetic.labels])
    return Split(images=images, labels=labels)


def load_sample_weights(directory: Path = RESAMPLED_DIR) -> np.ndarray:
    """Per-row sampling weights of the resampled train split (all equal: plain shuffling)."""
    return np.load(directory / "weights.npy")


def load_resample_warnings(directory: Path = RESAMPLED_DIR) -> tuple[str, ...]:
    """What the resample stage warned about (a strategy that fell back, say)."""
    path = directory / "warnings.json"
    return tuple(read_json(path)) if path.is_file() else ()
