"""Which image goes to which split: stratified train/val/test, and an optional long tail.

``stratified_split`` keeps a source's published test split where it has one
(Fashion-MNIST) and splits the rest stratified by class; ``long_tail`` makes
the train split long-tailed for ``data.imbalance_ratio`` > 1 (Cui et al.
2019), leaving val and test balanced. The prepare stage's ``split`` task
applies them to the images it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    official_test: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices of train/val/test, each stratified by label.

    Where the source publishes a test split it is kept as is, and validation is
    carved from the rest; otherwise test takes ``test_fraction`` of all items and
    val takes ``val_fraction`` of all items.

    ``groups`` (an id per item) keeps every group in one split: the groups'
    first members are split stratified by their labels, and each other member
    follows its first. Near-duplicate clusters are small, so the class mix
    barely moves. A group that a published test split cuts across stays cut
    (that split is kept as published); its other members still stay together.
    """
    if groups is not None:
        ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        if official_test is not None:  # a group's first member outside the test split
            outside = np.flatnonzero(~official_test)
            _, first_outside = np.unique(groups[outside], return_index=True)
            lead = dict(
                zip(groups[outside][first_outside].tolist(), outside[first_outside], strict=True)
            )
            first = np.array([lead.get(g, f) for g, f in zip(ids.tolist(), first, strict=True)])
        leads = stratified_split(
            labels[first], val_fraction, test_fraction, seed,
            None if official_test is None else official_test[first],
        )  # fmt: skip
        split_of_group = np.empty(len(first), dtype=object)
        for name, chosen in leads.items():
            split_of_group[chosen] = name
        follows = split_of_group[inverse]
        if official_test is not None:  # the published test split, exactly
            follows = np.where(official_test, "test", np.where(follows == "test", "train", follows))
        return {name: np.flatnonzero(follows == name) for name in ("train", "val", "test")}
    everything = np.arange(len(labels))
    try:
        if official_test is not None:
            test, rest = everything[official_test], everything[~official_test]
            val_share = val_fraction
        else:
            rest, test = train_test_split(
                everything, test_size=test_fraction, stratify=labels, random_state=seed
            )
            val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:
        counts = np.bincount(labels)
        raise ValueError(
            f"cannot split stratified by class (data.val_fraction={val_fraction}, "
            f"data.test_fraction={test_fraction}; smallest class has {counts.min()} images): {exc}"
        ) from None
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    for name, indices in splits.items():
        missing = np.setdiff1d(np.unique(labels), labels[indices])
        if missing.size:
            counts = np.bincount(labels)
            raise ValueError(
                f"class(es) {missing.tolist()} (with {counts[missing].tolist()} images) would have "
                f"no image in the {name} split (data.val_fraction={val_fraction}, "
                f"data.test_fraction={test_fraction}): add images to them or remove them"
            )
    return splits


def long_tail_counts(counts: list[int], ratio: float) -> list[int]:
    """Per-class sizes of the exponential long-tail profile.

    Class ``k`` of ``C`` keeps ``n_max * ratio ** (-k / (C - 1))`` images, so the
    first class keeps ``n_max`` and the last ``n_max / ratio`` (Cui et al. 2019,
    "Class-Balanced Loss Based on Effective Number of Samples"; Cao et al. 2019,
    LDAM). A class never grows and keeps at least one image.
    """
    n_max, last = max(counts), len(counts) - 1
    return [min(count, max(1, int(n_max * ratio ** (-k / last)))) for k, count in enumerate(counts)]


def long_tail(train: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """A seeded random subset of the train indices following ``long_tail_counts``."""
    if ratio == 1.0:
        return train
    num_classes = int(labels.max()) + 1
    members = [train[labels[train] == c] for c in range(num_classes)]
    targets = long_tail_counts([len(m) for m in members], ratio)
    rng = np.random.default_rng(seed)
    kept = [rng.choice(m, size=t, replace=False) for m, t in zip(members, targets, strict=True)]
    return np.sort(np.concatenate(kept))


@dataclass(frozen=True)
class SplitPlan:
    """Staging rows of each split, in order."""

    positions: dict[str, np.ndarray]
    long_tail_dropped: int
    grouped: bool = False  # near-duplicate clusters were kept in one split
