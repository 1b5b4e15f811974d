"""Resample stage core on an imbalanced 8x8 train split (class counts 20, 8, 4)."""

from __future__ import annotations

import numpy as np
import pytest
from imblearn.over_sampling import SMOTE, RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from tasks.datasets import Split
from tasks.params import ResampleParams
from tasks.resample import Resampled, build_sampler, resample

COUNTS = [20, 8, 4]
SEED = 0


@pytest.fixture
def train() -> Split:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS).astype(np.int64)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 1), dtype=np.uint8)
    return Split(images, labels)


def _params(strategy: str, k_neighbors: int = 3) -> ResampleParams:
    return ResampleParams(strategy=strategy, sampling_strategy="auto", k_neighbors=k_neighbors)


def _run(train: Split, strategy: str, k_neighbors: int = 3) -> Resampled:
    return resample.fn(train, len(COUNTS), _params(strategy, k_neighbors), SEED)


def _labels_after(train: Split, result: Resampled) -> np.ndarray:
    return np.concatenate([train.labels[result.indices], result.synthetic.labels])


def test_none_is_identity(train: Split) -> None:
    result = _run(train, "none")
    assert np.array_equal(result.indices, np.arange(len(train)))
    assert result.synthetic.images.shape == (0, 8, 8, 1)
    assert result.synthetic.images.dtype == np.uint8
    assert result.counts_before == result.counts_after == COUNTS


def test_random_over_brings_every_class_to_the_max(train: Split) -> None:
    result = _run(train, "random_over")
    assert result.counts_before == COUNTS
    assert result.counts_after == [20, 20, 20]
    assert result.indices.min() >= 0 and result.indices.max() < len(train)
    assert set(result.indices.tolist()) == set(range(len(train)))  # every original kept
    assert np.bincount(_labels_after(train, result)).tolist() == result.counts_after
    assert len(result.synthetic) == 0


def test_random_under_brings_every_class_to_the_min(train: Split) -> None:
    result = _run(train, "random_under")
    assert result.counts_after == [4, 4, 4]
    assert len(np.unique(result.indices)) == len(result.indices) == 12
    assert result.indices.min() >= 0 and result.indices.max() < len(train)
    assert np.bincount(train.labels[result.indices]).tolist() == [4, 4, 4]


def test_smote_makes_minority_images_between_their_neighbours(train: Split) -> None:
    result = _run(train, "smote")
    synthetic = result.synthetic
    assert np.array_equal(result.indices, np.arange(len(train)))
    assert synthetic.images.dtype == np.uint8
    assert synthetic.images.shape == (20 - 8 + 20 - 4, 8, 8, 1)
    assert set(synthetic.labels.tolist()) == {1, 2}
    assert result.counts_after == [20, 20, 20]
    assert np.bincount(_labels_after(train, result)).tolist() == [20, 20, 20]
    # SMOTE interpolates between two images of the same class, so every synthetic
    # pixel lies within that class's range: this catches images and labels out of step.
    for image, label in zip(synthetic.images, synthetic.labels, strict=True):
        own = train.images[train.labels == label].astype(int)
        assert (image >= own.min(axis=0) - 1).all() and (image <= own.max(axis=0) + 1).all()


def test_same_seed_same_rows(train: Split) -> None:
    first, again = _run(train, "random_over"), _run(train, "random_over")
    assert np.array_equal(first.indices, again.indices)
    other = resample.fn(train, len(COUNTS), _params("random_over"), SEED + 1)
    assert not np.array_equal(first.indices, other.indices)


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        ("none", type(None)),
        ("random_over", RandomOverSampler),
        ("random_under", RandomUnderSampler),
        ("smote", SMOTE),
    ],
)
def test_build_sampler_passes_params_through(strategy: str, kind: type) -> None:
    sampler = build_sampler(_params(strategy, k_neighbors=2), seed=11)
    assert isinstance(sampler, kind)
    if sampler is not None:
        assert sampler.random_state == 11
        assert sampler.sampling_strategy == "auto"
    if isinstance(sampler, SMOTE):
        assert sampler.k_neighbors == 2


def test_build_sampler_unknown_name_lists_valid_ones() -> None:
    # model_construct skips validation, as if params.py and SAMPLERS had drifted apart.
    bogus = ResampleParams.model_construct(
        strategy="adasyn", sampling_strategy="auto", k_neighbors=3
    )
    with pytest.raises(ValueError, match="'adasyn'") as info:
        build_sampler(bogus, SEED)
    assert "none, random_over, random_under, smote" in str(info.value)


def test_smote_with_too_many_neighbours_names_the_param(train: Split) -> None:
    with pytest.raises(ValueError, match=r"resample\.k_neighbors=5") as info:
        _run(train, "smote", k_neighbors=5)  # the smallest class has 4 images
    assert str(COUNTS) in str(info.value)
