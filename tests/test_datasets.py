"""The prepared-data format: streamed .npy writing and the memory-mapped resampled view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.datasets import (
    NpyWriter,
    PreparedData,
    Rows,
    Split,
    load_prepared,
    load_resampled_train,
    write_prepared,
    write_split,
)
from tests.imagefolders import noise


def test_npy_writer_streams_a_loadable_array(tmp_path: Path) -> None:
    rows = noise((10, 3, 3, 2), 0)
    with NpyWriter(tmp_path / "x.npy", rows.shape) as writer:
        for start in range(0, 10, 4):
            writer.append(rows[start : start + 4])
    assert np.array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), rows)


def test_npy_writer_refuses_missing_or_extra_rows(tmp_path: Path) -> None:
    short = NpyWriter(tmp_path / "short.npy", (3, 2))
    short.append(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="2 rows written, 3 promised"):
        short.close()
    writer = NpyWriter(tmp_path / "long.npy", (1, 2))
    with pytest.raises(ValueError, match="does not fit"):
        writer.append(np.zeros((2, 2), np.uint8))


def test_resampled_train_is_a_view_on_the_memory_map(
    tiny_prepared: PreparedData, tmp_path: Path
) -> None:
    prepared_dir, resampled_dir = tmp_path / "prepared", tmp_path / "resampled"
    write_prepared(
        prepared_dir,
        {"train": tiny_prepared.train, "val": tiny_prepared.val, "test": tiny_prepared.test},
        tiny_prepared.classes,
        tiny_prepared.stats,
    )
    indices = np.array([3, 3, 0, 7])
    synthetic = Split(noise((2, 8, 8, 1), 5), np.array([1, 2]))
    resampled_dir.mkdir()
    np.save(resampled_dir / "indices.npy", indices)
    write_split(resampled_dir / "synthetic", synthetic)

    prepared = load_prepared(prepared_dir)
    train = load_resampled_train(prepared, resampled_dir)
    assert isinstance(train.images, Rows)
    assert isinstance(train.images.base, np.memmap)
    expected = np.concatenate([tiny_prepared.train.images[indices], synthetic.images])
    assert len(train.images) == len(train.labels) == 6
    assert train.images.shape == expected.shape
    assert all(np.array_equal(train.images[i], expected[i]) for i in range(-6, 6))
    assert np.array_equal(np.asarray(train.images), expected)
    assert train.labels.tolist() == [*tiny_prepared.train.labels[indices].tolist(), 1, 2]
    with pytest.raises(IndexError):
        train.images[6]
