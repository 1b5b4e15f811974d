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
    take_rows,
    write_prepared,
    write_split,
)
from tasks.data.pixels import ChannelStats, normalise
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


def test_normalise_standardises_with_train_stats(tiny_prepared: PreparedData) -> None:
    images, stats = tiny_prepared.train.images, tiny_prepared.stats
    out = normalise(images, stats)
    assert out.dtype == np.float32
    assert out.shape == (len(images), 1, 8, 8)
    assert out.flags.c_contiguous
    assert out.mean() == pytest.approx(0.0, abs=1e-5)
    assert out.std() == pytest.approx(1.0, abs=1e-4)
    assert normalise(images[0], stats).shape == (1, 8, 8)  # one HWC image -> CHW


def test_normalise_channel_order() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 51, 102, 255
    stats = ChannelStats(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    out = normalise(image, stats)
    assert out.shape == (3, 2, 3)
    expected = [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (1.0 - 0.3) / 0.1]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


def test_rows_take_matches_row_by_row_reads() -> None:
    base = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
    extra = np.full((2, 2, 2, 1), 200, dtype=np.uint8)
    view = Rows(base, np.array([4, 0, 4]), extra)
    rows = np.array([4, 0, 2, -1, 3])
    np.testing.assert_array_equal(view.take(rows), np.stack([view[i] for i in rows]))
    np.testing.assert_array_equal(take_rows(base, [1, 1]), base[[1, 1]])
    with pytest.raises(IndexError):
        view.take(np.array([5]))
