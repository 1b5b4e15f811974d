"""Prepare's cores: parallel decode, quarantine and de-duplication, splits, long tail, writing."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tasks.data.datasets import ChannelStats, load_prepared
from tasks.data.images import ArrayItems, FileItems, ImageSpec, Outcome
from tasks.data.prepare import (
    Decoded,
    ImageShape,
    SplitPlan,
    Staging,
    auto_size,
    content_versioned,
    copy_splits,
    decode_all,
    image_spec,
    long_tail,
    long_tail_counts,
    select,
    staging_file,
    stratified_split,
)
from tasks.data.sources import Source
from tasks.params import DataParams, Params
from tests.imagefolders import noise


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return noise(shape, seed)


def _array_source(pixels: np.ndarray, labels: list[int], official=None) -> Source:
    return Source(
        name="memory",
        classes=tuple("abcdefghij"[: max(labels) + 1]),
        labels=np.asarray(labels, dtype=np.int64),
        items=ArrayItems(pixels),
        item_names=np.asarray([f"memory[{i}]" for i in range(len(labels))], dtype=object),
        official_test=None if official is None else np.asarray(official),
    )


def _data(params: Params, **update: object) -> DataParams:
    return DataParams(**{**params.data.model_dump(), **update})


# ---------------------------------------------------------------- decode_all


def test_parallel_decode_matches_sequential(params: Params, tmp_path: Path) -> None:
    pixels = _noise((700, 12, 12))  # three chunks of 256
    source = _array_source(pixels, [i % 3 for i in range(700)])
    spec = image_spec(_data(params, image_size=8, channels=3, min_size=8))
    results = {}
    for workers in (1, 2):
        with staging_file(tmp_path / f"out{workers}", len(source), spec) as staging:
            outcomes = decode_all(source, spec, staging, workers, log=lambda line: None)
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
    source = _array_source(_noise((8, 4, 4)), [0, 0, 0, 1, 1, 1, 0, 1])
    outcomes = [
        _ok(b"p"), _ok(b"q"), Outcome("truncated", "cut", b"r", "PNG"), _ok(b"s"),
        _ok(b"t"), _ok(b"p"), _ok(b"q"), _ok(b"s"),
    ]  # fmt: skip
    selection = select(source, Decoded.of(outcomes), min_per_class=1)
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
    source = _array_source(_noise((4, 4, 4)), [0, 0, 1, 1], official=[False, True, False, False])
    outcomes = [_ok(b"x"), _ok(b"x"), _ok(b"y"), _ok(b"z")]
    selection = select(source, Decoded.of(outcomes), min_per_class=1)
    assert selection.positions.tolist() == [1, 2, 3]
    assert selection.duplicates == [{"class": "a", "kept": "memory[1]", "dropped": ["memory[0]"]}]


def test_select_fails_when_a_class_is_left_below_min_per_class() -> None:
    source = _array_source(_noise((6, 4, 4)), [0, 0, 0, 1, 1, 1])
    outcomes = [_ok(b"a"), _ok(b"b"), _ok(b"c"), _ok(b"d"), Outcome("empty_file", "0 bytes")]
    outcomes.append(Outcome("not_an_image", "?"))
    with pytest.raises(ValueError, match=r"min_per_class=3 usable images: b: 1 usable") as info:
        select(source, Decoded.of(outcomes), min_per_class=3)
    assert "'empty_file': 1" in str(info.value)


# ---------------------------------------------------------------- long tail


def test_long_tail_counts_follow_the_exponential_profile() -> None:
    assert long_tail_counts([100] * 5, 1.0) == [100] * 5
    assert long_tail_counts([100] * 3, 100.0) == [100, 10, 1]
    counts = long_tail_counts([500] * 10, 50.0)
    assert counts[0] == 500 and counts[-1] == 10
    assert all(a > b for a, b in itertools.pairwise(counts))
    assert long_tail_counts([100, 3, 100], 10.0) == [100, 3, 10]  # never grows a class


def test_long_tail_subsets_train_only_seeded() -> None:
    labels = np.repeat(np.arange(4), 60)
    train = np.arange(0, 240, 2)  # 30 per class
    kept = long_tail(train, labels, 10.0, seed=0)
    assert np.isin(kept, train).all()
    assert np.bincount(labels[kept]).tolist() == long_tail_counts([30] * 4, 10.0)
    assert np.array_equal(kept, long_tail(train, labels, 10.0, seed=0))
    assert long_tail(train, labels, 1.0, seed=0) is train


# ---------------------------------------------------------------- stratified_split


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


@pytest.mark.parametrize("counts", [[40, 25, 12], [9, 31, 17, 50, 8], [100, 100]])
@pytest.mark.parametrize("seed", [0, 7])
def test_split_disjoint_complete_and_stratified(counts: list[int], seed: int) -> None:
    labels = _labels(counts, seed)
    splits = stratified_split(labels, val_fraction=0.15, test_fraction=0.2, seed=seed)
    everything = np.concatenate(list(splits.values()))
    assert len(everything) == len(labels)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    for name, fraction in (("val", 0.15), ("test", 0.2)):
        per_class = np.bincount(labels[splits[name]], minlength=len(counts))
        assert np.abs(per_class - fraction * np.asarray(counts)).max() <= 1.0, name


def test_split_is_deterministic_for_a_seed() -> None:
    labels = _labels([40, 25, 12])
    first = stratified_split(labels, 0.15, 0.15, seed=3)
    again = stratified_split(labels, 0.15, 0.15, seed=3)
    other = stratified_split(labels, 0.15, 0.15, seed=4)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])


def test_split_keeps_official_test_exactly() -> None:
    labels = _labels([30, 30, 20])
    official = np.zeros(len(labels), dtype=bool)
    official[::5] = True
    splits = stratified_split(labels, 0.15, 0.4, seed=0, official_test=official)
    assert np.array_equal(splits["test"], np.flatnonzero(official))
    rest = np.concatenate([splits["train"], splits["val"]])
    assert np.array_equal(np.sort(rest), np.flatnonzero(~official))
    assert not np.intersect1d(splits["train"], splits["val"]).size


def test_split_class_too_small_is_a_clear_error() -> None:
    labels = _labels([1, 20, 20])
    with pytest.raises(ValueError, match="smallest class has 1 images") as info:
        stratified_split(labels, 0.15, 0.15, seed=0)
    assert "data.val_fraction=0.15" in str(info.value)


def test_split_refuses_to_leave_a_class_out_of_a_split() -> None:
    # 2 images cannot cover train, val and test: a silent gap would score that class 0.
    with pytest.raises(ValueError, match=r"class\(es\) \[0\] \(with \[2\] images\)"):
        stratified_split(_labels([2, 10, 10]), 0.15, 0.15, seed=0)


# ---------------------------------------------------------------- ChannelStats


def test_channel_stats_match_numpy() -> None:
    images = _noise((50, 4, 4, 3))
    scaled = images / 255.0
    for chunk in (7, 4096):  # several chunks and one
        stats = ChannelStats.of(images, chunk=chunk)
        np.testing.assert_allclose(stats.mean, scaled.mean(axis=(0, 1, 2)), atol=1e-12)
        np.testing.assert_allclose(stats.std, scaled.std(axis=(0, 1, 2)), atol=1e-9)


def test_constant_channel_gets_unit_std() -> None:
    images = _noise((10, 4, 4, 2))
    images[..., 1] = 77
    stats = ChannelStats.of(images)
    assert stats.std[1] == 1.0
    assert stats.mean[1] == pytest.approx(77 / 255)
    assert stats.std[0] != 1.0


# ---------------------------------------------------------------- copy_splits


def test_copy_splits_writes_rows_labels_and_train_stats(tmp_path: Path) -> None:
    pixels = _noise((30, 6, 6, 3))
    staging_path = tmp_path / "staging.npy"
    np.save(staging_path, pixels)
    staging = Staging(staging_path, staging_path.stat().st_size - pixels.nbytes)
    labels = np.arange(30) % 3
    plan = SplitPlan(
        {"train": np.arange(0, 20), "val": np.arange(20, 25), "test": np.arange(25, 30)}, 0
    )
    spec = ImageSpec(size=6, channels=3, resize="pad", background=0, min_size=2)
    stats = copy_splits(staging, plan, labels, tmp_path / "out", ("x", "y", "z"), spec, log=print)
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


def _file_source(paths: list[Path]) -> Source:
    return Source(
        name="folder",
        classes=("a",),
        labels=np.zeros(len(paths), dtype=np.int64),
        items=FileItems(np.asarray([str(p) for p in paths], dtype=object)),
        item_names=np.asarray([str(p) for p in paths], dtype=object),
    )


def test_auto_format_is_read_off_the_images(params: Params, tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, (size, mode) in enumerate([((40, 30), "L"), ((80, 100), "L"), ((27, 60), "LA")]):
        paths.append(tmp_path / f"gray{i}.png")
        Image.new(mode, size).save(paths[-1])
    grey_palette = Image.new("L", (50, 50)).convert("P")
    grey_palette.save(tmp_path / "palette.png")
    paths.append(tmp_path / "palette.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")  # skipped: quarantined later
    paths.append(tmp_path / "broken.png")
    auto = _data(params, channels="auto", image_size="auto")
    spec = image_spec(auto, _file_source(paths))
    # median shorter side of 30, 80, 27, 50 is 40: a multiple of 4 within 16-32 -> 32
    assert (spec.channels, spec.size) == (1, 32)
    colour = tmp_path / "colour.jpg"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(colour)
    spec = image_spec(auto, _file_source([*paths, colour]))
    assert spec.channels == 3
    assert image_spec(_data(params, channels=3, image_size=24)).size == 24
    with pytest.raises(ValueError, match="auto need the source"):
        image_spec(auto)


def test_auto_size_rounds_the_median_into_bounds() -> None:
    def shapes(*sides: int) -> list[ImageShape]:
        return [ImageShape(side, side + 5, True) for side in sides]

    assert auto_size(shapes(8, 8, 8)) == 16  # digits: raised to the floor
    assert auto_size(shapes(28, 28)) == 28  # Fashion-MNIST keeps its size
    assert auto_size(shapes(21, 21, 22)) == 20
    assert auto_size(shapes(300, 500, 640)) == 32  # photos: capped
    assert auto_size([]) == 16


def test_array_sources_say_their_own_format(params: Params) -> None:
    gray = _array_source(_noise((6, 28, 28)), [0, 1, 0, 1, 0, 1])
    auto = _data(params, channels="auto", image_size="auto")
    assert (image_spec(auto, gray).channels, image_spec(auto, gray).size) == (1, 28)
    rgb = _array_source(_noise((6, 10, 10, 3)), [0, 1, 0, 1, 0, 1])
    assert (image_spec(auto, rgb).channels, image_spec(auto, rgb).size) == (3, 16)
