"""Resample stage core on an imbalanced 8x8 train split (class counts 20, 8, 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from imblearn.combine import SMOTEENN, SMOTETomek
from imblearn.over_sampling import ADASYN, SMOTE, BorderlineSMOTE, RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats
from tasks.data.resample import (
    NEEDS_FEATURES,
    SAMPLERS,
    Resampled,
    build_sampler,
    feature_matrix,
    resample,
)
from tasks.models import build_model
from tasks.params import ResampleParams

COUNTS = [20, 8, 4]
SEED = 0
SMOTE_LIKE = sorted(NEEDS_FEATURES)


@pytest.fixture
def train() -> Split:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS).astype(np.int64)
    rng.shuffle(labels)
    # class c is a little brighter with c, and the classes overlap: border cases
    # (which ADASYN and borderline SMOTE look for) exist in any feature space
    images = np.clip(
        rng.normal(100 + 15 * labels[:, None, None, None], 50, (len(labels), 8, 8, 1)), 0, 255
    )
    return Split(images.astype(np.uint8), labels)


def _params(strategy: str, k_neighbors: int = 3, **update: object) -> ResampleParams:
    settings = {"space": "pixels", "embedding_checkpoint": None, **update}
    return ResampleParams(
        strategy=strategy, sampling_strategy="auto", k_neighbors=k_neighbors, **settings
    )


def _run(train: Split, strategy: str, k_neighbors: int = 3, **update: object) -> Resampled:
    stats = ChannelStats.of(train.images)
    return resample.fn(train, len(COUNTS), _params(strategy, k_neighbors, **update), SEED, stats)


def _labels_after(train: Split, result: Resampled) -> np.ndarray:
    return np.concatenate([train.labels[result.indices], result.synthetic.labels])


def test_none_is_identity(train: Split) -> None:
    result = _run(train, "none")
    assert np.array_equal(result.indices, np.arange(len(train)))
    assert len(result.synthetic) == 0
    assert (result.weights == 1).all()
    assert result.counts_before == result.counts_after == COUNTS


def test_random_over_brings_every_class_to_the_max(train: Split) -> None:
    result = _run(train, "random_over")
    assert len(result.synthetic) == 0
    assert np.bincount(_labels_after(train, result)).tolist() == [20, 20, 20]
    assert result.counts_after == [20, 20, 20]
    assert set(range(len(train))) <= set(result.indices.tolist())  # every original kept


def test_random_under_brings_every_class_to_the_min(train: Split) -> None:
    result = _run(train, "random_under")
    assert len(np.unique(result.indices)) == len(result.indices) == 12
    assert result.indices.min() >= 0 and result.indices.max() < len(train)
    assert np.bincount(train.labels[result.indices]).tolist() == [4, 4, 4]


def _on_a_segment(image: np.ndarray, own: np.ndarray) -> bool:
    """Whether ``image`` is (to rounding) a + lam * (b - a) for two images a, b of ``own``."""
    x = image.astype(float).ravel()
    pts = own.reshape(len(own), -1).astype(float)
    for a in pts:
        d = pts - a
        norms = (d * d).sum(axis=1)
        lam = np.clip(
            np.divide((d @ (x - a)), norms, out=np.zeros_like(norms), where=norms > 0), 0, 1
        )
        # within one grey level: rounding, and the L2 projection is not the L-inf optimum
        if (np.abs(a + lam[:, None] * d - x).max(axis=1) <= 1.0).any():
            return True
    return False


@pytest.mark.parametrize("space", ["pixels", "embeddings"])
@pytest.mark.parametrize("strategy", SMOTE_LIKE)
def test_smote_like_samplers_synthesise_images_between_same_class_neighbours(
    train: Split, strategy: str, space: str
) -> None:
    result = _run(train, strategy, space=space)
    synthetic = result.synthetic
    assert synthetic.images.dtype == np.uint8
    assert synthetic.images.shape[1:] == (8, 8, 1)
    assert len(synthetic) > 0
    assert set(synthetic.labels.tolist()) <= {1, 2}  # only minority classes grow
    assert np.bincount(_labels_after(train, result), minlength=3).tolist() == result.counts_after
    assert result.k_neighbors == 3
    # In either space, the stored pixels are the interpolation of two images of
    # the same class: this catches images and labels out of step, and checks that
    # embedding-space neighbours carry their pixels along exactly.
    for image, label in zip(synthetic.images[:12], synthetic.labels[:12], strict=True):
        assert _on_a_segment(image, train.images[train.labels == label]), (strategy, label)


@pytest.mark.parametrize("strategy", ["smote", "random_over"])
def test_samplers_give_the_requested_class_counts(train: Split, strategy: str) -> None:
    assert _run(train, strategy).counts_after == [20, 20, 20]  # "auto": every class to the max


def test_cleaning_samplers_only_remove_after_smote(train: Split) -> None:
    smote = _run(train, "smote")
    for strategy in ("smote_tomek", "smote_enn"):
        cleaned = _run(train, strategy)
        assert all(a <= b for a, b in zip(cleaned.counts_after, smote.counts_after, strict=True))
        assert set(cleaned.indices.tolist()) <= set(range(len(train)))


def test_k_neighbors_is_capped_by_the_smallest_class(train: Split) -> None:
    result = _run(train, "smote", k_neighbors=7)  # the smallest class has 4 images
    assert result.k_neighbors == 3
    assert result.counts_after == [20, 20, 20]


def test_a_class_of_one_cannot_be_smoted(train: Split) -> None:
    keep = np.r_[np.flatnonzero(train.labels != 2), np.flatnonzero(train.labels == 2)[:1]]
    single = Split(train.images[keep], train.labels[keep])
    with pytest.raises(ValueError, match=r"a class has 1 train image.*random_over or balanced"):
        resample.fn(single, 3, _params("smote"), SEED)


def test_embeddings_from_a_teacher_checkpoint(train: Split, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", 1, 3, 4, 0.0)
    stats = ChannelStats.of(train.images)
    path = tmp_path / "teacher.pt"
    save_checkpoint(
        path,
        Checkpoint("resnet", 4, 0.0, 1, 8, ("a", "b", "c"), stats, {}, {}, model.state_dict()),
    )
    result = _run(train, "smote", space="embeddings", embedding_checkpoint=path)
    assert result.counts_after == [20, 20, 20]
    for image, label in zip(result.synthetic.images[:6], result.synthetic.labels[:6], strict=True):
        assert _on_a_segment(image, train.images[train.labels == label])


def test_embedding_space_keeps_pixels_exact_and_neighbours_unchanged() -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    embeddings = np.random.default_rng(2).normal(size=(5, 7))
    features, scale = feature_matrix(images, embeddings)
    assert np.array_equal(np.rint(features[:, 7:] / scale), images.reshape(5, -1))
    full = ((features[:, None] - features[None]) ** 2).sum(-1)
    only = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    assert np.abs(full - only).max() < 1e-7


def test_balanced_sampler_makes_weights_not_copies(train: Split) -> None:
    result = _run(train, "balanced_sampler")
    assert np.array_equal(result.indices, np.arange(len(train)))
    assert len(result.synthetic) == 0
    mass = np.bincount(train.labels, weights=result.weights)
    assert np.allclose(mass, mass[0])  # each class equally likely per draw
    assert result.counts_before == COUNTS


def test_same_seed_same_rows(train: Split) -> None:
    first, again = _run(train, "random_over"), _run(train, "random_over")
    assert np.array_equal(first.indices, again.indices)
    other = resample.fn(train, len(COUNTS), _params("random_over"), SEED + 1)
    assert not np.array_equal(first.indices, other.indices)


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        ("none", type(None)),
        ("balanced_sampler", type(None)),
        ("random_over", RandomOverSampler),
        ("random_under", RandomUnderSampler),
        ("smote", SMOTE),
        ("borderline_smote", BorderlineSMOTE),
        ("adasyn", ADASYN),
        ("smote_tomek", SMOTETomek),
        ("smote_enn", SMOTEENN),
    ],
)
def test_build_sampler_passes_params_through(strategy: str, kind: type) -> None:
    sampler = build_sampler(_params(strategy, k_neighbors=2), seed=11)
    assert isinstance(sampler, kind)
    if sampler is not None:
        assert sampler.random_state == 11
        assert sampler.sampling_strategy == "auto"
    inner = getattr(sampler, "smote", sampler)
    if isinstance(inner, SMOTE | BorderlineSMOTE):
        assert inner.k_neighbors == 2
    if isinstance(sampler, ADASYN):
        assert sampler.n_neighbors == 2


def test_build_sampler_unknown_name_lists_valid_ones() -> None:
    # model_construct skips validation, as if params.py and SAMPLERS had drifted apart.
    bogus = ResampleParams.model_construct(
        strategy="tomek_only", sampling_strategy="auto", k_neighbors=3
    )
    with pytest.raises(ValueError, match="'tomek_only'") as info:
        build_sampler(bogus, SEED)
    assert ", ".join(SAMPLERS) in str(info.value)


def test_adasyn_falls_back_to_smote_where_its_density_ratios_are_undefined() -> None:
    """Well separated classes: no minority sample has a neighbour of another class, so
    imbalanced-learn's ADASYN divides 0 by 0 and raises; the stage goes on with SMOTE."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS).astype(np.int64)
    images = np.clip(
        rng.normal(20 + 100 * labels[:, None, None, None], 3, (len(labels), 8, 8, 1)), 0, 255
    )
    separated = Split(images.astype(np.uint8), labels)
    features, _ = feature_matrix(separated.images)
    with pytest.raises(RuntimeError, match="Not any neigbours"):  # the failure being handled
        build_sampler(_params("adasyn"), SEED, 3).fit_resample(features, labels)

    result = _run(separated, "adasyn")
    assert result.strategy_used == "smote"
    assert len(result.warnings) == 1 and "fell back to SMOTE" in result.warnings[0]
    smote = _run(separated, "smote")
    assert np.bincount(_labels_after(separated, result)).tolist() == [20, 20, 20]
    assert np.array_equal(result.synthetic.images, smote.synthetic.images)  # SMOTE's own draws


def test_adasyn_where_it_is_defined_runs_as_itself(train: Split) -> None:
    result = _run(train, "adasyn")
    assert result.strategy_used is None and result.warnings == ()
