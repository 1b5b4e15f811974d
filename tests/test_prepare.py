"""Prepare's cores: parallel decode, quarantine and de-duplication, splits, long tail, writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.datasets import load_prepared
from tasks.data.images import ImageSpec, Outcome
from tasks.data.pixels import ChannelStats
from tasks.data.prepare import (
    Decoded,
    Staging,
    content_versioned,
    copy_splits,
    decode,
    select,
    staging_file,
)
from tasks.data.spec import image_spec
from tasks.data.splits import SplitPlan
from tasks.params import Params
from tests.datasources import array_source, data_params
from tests.imagefolders import noise

# ---------------------------------------------------------------- decode


@pytest.mark.integration
def test_parallel_decode_matches_sequential(params: Params, tmp_path: Path) -> None:
    pixels = noise((700, 12, 12), 0)  # three chunks of 256
    source = array_source(pixels, [i % 3 for i in range(700)])
    spec = image_spec(data_params(params, image_size=8, channels=3, min_size=8))
    results = {}
    for workers in (1, 2):
        with staging_file(tmp_path / f"out{workers}", len(source), spec) as staging:
            outcomes = decode.fn(source, spec, staging, workers, log=lambda line: None)
            results[workers] = (outcomes, np.load(staging.path))
    for field in ("reasons", "details", "digests"):
        assert np.array_equal(getattr(results[1][0], field), getattr(results[2][0], field))
    assert np.array_equal(results[1][1], results[2][1])
    assert results[2][1].shape == (700, 8, 8, 3)
    assert results[2][0].ok.all()
    assert results[2][0].conversions == {"L->RGB": 700, "resized:stretch": 700}
    assert not list(tmp_path.glob(".out*"))  # staging removed


# ---------------------------------------------------------------- select


def _ok(digest: bytes) -> Outcome:
    return Outcome(digest=digest, format="PNG")


def test_select_quarantines_failures_and_keeps_one_copy_of_duplicates() -> None:
    source = array_source(noise((8, 4, 4), 0), [0, 0, 0, 1, 1, 1, 0, 1])
    outcomes = [
        _ok(b"p"), _ok(b"q"), Outcome("truncated", "cut", b"r", "PNG"), _ok(b"s"),
        _ok(b"t"), _ok(b"p"), _ok(b"q"), _ok(b"s"),
    ]  # fmt: skip
    selection = select.fn(source, Decoded.of(outcomes), min_per_class=1)
    # p: labels 0 and 1 -> both quarantined; q: twice in class 0 -> first kept;
    # s: twice in class 1 -> first kept
    assert selection.positions.tolist() == [1, 3, 4]
    assert {(q["path"], q["reason"]) for q in selection.quarantined} == {
        ("memory[2]", "truncated"),
        ("memory[0]", "conflicting_labels"),
        ("memory[5]", "conflicting_labels"),
    }
    assert sorted((d["kept"], tuple(d["dropped"])) for d in selection.duplicates) == [
        ("memory[1]", ("memory[6]",)),
        ("memory[3]", ("memory[7]",)),
    ]


def test_select_keeps_the_official_test_copy_of_a_duplicate() -> None:
    source = array_source(noise((4, 4, 4), 0), [0, 0, 1, 1], official=[False, True, False, False])
    outcomes = [_ok(b"x"), _ok(b"x"), _ok(b"y"), _ok(b"z")]
    selection = select.fn(source, Decoded.of(outcomes), min_per_class=1)
    assert selection.positions.tolist() == [1, 2, 3]
    assert selection.duplicates == [{"class": "a", "kept": "memory[1]", "dropped": ["memory[0]"]}]


def test_select_fails_when_a_class_is_left_below_min_per_class() -> None:
    source = array_source(noise((6, 4, 4), 0), [0, 0, 0, 1, 1, 1])
    outcomes = [_ok(b"a"), _ok(b"b"), _ok(b"c"), _ok(b"d"), Outcome("empty_file", "0 bytes")]
    outcomes.append(Outcome("not_an_image", "?"))
    with pytest.raises(ValueError, match=r"min_per_class=3 usable images: b: 1 usable") as info:
        select.fn(source, Decoded.of(outcomes), min_per_class=3)
    assert "'empty_file': 1" in str(info.value)


# ---------------------------------------------------------------- long tail


# ---------------------------------------------------------------- stratified_split


# ---------------------------------------------------------------- ChannelStats


def test_channel_stats_match_numpy() -> None:
    images = noise((50, 4, 4, 3), 0)
    scaled = images / 255.0
    for chunk in (7, 4096):  # several chunks and one
        stats = ChannelStats.of(images, chunk=chunk)
        np.testing.assert_allclose(stats.mean, scaled.mean(axis=(0, 1, 2)), atol=1e-12)
        np.testing.assert_allclose(stats.std, scaled.std(axis=(0, 1, 2)), atol=1e-9)


def test_constant_channel_gets_unit_std() -> None:
    images = noise((10, 4, 4, 2), 0)
    images[..., 1] = 77
    stats = ChannelStats.of(images)
    assert stats.std[1] == 1.0
    assert stats.mean[1] == pytest.approx(77 / 255)
    assert stats.std[0] != 1.0


# ---------------------------------------------------------------- copy_splits


def test_copy_splits_writes_rows_labels_and_train_stats(tmp_path: Path) -> None:
    pixels = noise((30, 6, 6, 3), 0)
    staging_path = tmp_path / "staging.npy"
    np.save(staging_path, pixels)
    staging = Staging(staging_path, staging_path.stat().st_size - pixels.nbytes)
    labels = np.arange(30) % 3
    plan = SplitPlan(
        {"train": np.arange(0, 20), "val": np.arange(20, 25), "test": np.arange(25, 30)}, 0
    )
    spec = ImageSpec(size=6, channels=3, resize="pad", background=0, min_size=2)
    stats = copy_splits(
        staging,
        plan,
        labels,
        np.array([f"i{k}" for k in range(len(labels))]),
        tmp_path / "out",
        ("x", "y", "z"),
        spec,
        log=print,
    )
    prepared = load_prepared(tmp_path / "out")
    # inference repeats exactly this decoding; min_size is a prepare-only filter
    assert prepared.preprocessing == spec.preprocessing()
    assert ImageSpec.from_preprocessing(prepared.preprocessing) == ImageSpec(6, 3, "pad", 0, 1)
    assert np.array_equal(prepared.train.images, pixels[:20])
    assert np.array_equal(prepared.test.labels, labels[25:])
    assert prepared.classes == ("x", "y", "z")
    assert stats == ChannelStats.of(pixels[:20]) == prepared.stats


def test_content_versioned_only_under_data_raw(tmp_path: Path) -> None:
    (tmp_path / "data/raw/pets").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert content_versioned(str(tmp_path / "data/raw/pets"), root=tmp_path) is True
    assert content_versioned(str(tmp_path / "elsewhere"), root=tmp_path) is False
    assert content_versioned("digits", root=tmp_path) is None


# ---------------------------------------------------------------- data.channels / image_size: auto
