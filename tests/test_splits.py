"""Stratified splits (keeping a published test split) and the long-tailed train split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks.data.splits import long_tail, long_tail_counts, stratified_split


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
