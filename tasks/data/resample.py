"""Resample stage: rebalance the TRAIN split with imbalanced-learn, or per epoch.

Run with ``dvc repro resample`` (or ``python -m flows.resample``). Reads the
``seed`` and ``resample`` sections. Val and test are never touched: a model must
be judged on the class mix it will meet. Writes ``data/resampled/``: rows of
the prepared train split (repeats allowed), synthetic images for SMOTE-like
samplers, and a sampling weight per row; plus ``metrics/resample.json`` with
the class counts before and after.

Strategies (``resample.strategy``):

- ``random_over`` / ``random_under``: repeat or drop rows (no features needed);
- ``smote``, ``borderline_smote``, ``adasyn``: synthesise minority images by
  interpolating between neighbours; ``smote_tomek`` and ``smote_enn`` then clean
  the class borders (Tomek links, edited nearest neighbours);
- ``balanced_sampler``: no copies at all; the training DataLoader draws each
  epoch with class-balanced probabilities (``weights.npy``);
- ``none``.

Neighbours are found in pixel space or in an embedding space
(``resample.space``, ``tasks/data/embeddings.py``). Either way the synthetic samples
are stored as images: in embedding space each feature vector carries the
image's pixels, scaled down so far that they never move a neighbour ranking
(see ``feature_matrix``), and since SMOTE-like samplers interpolate linearly,
the pixel part of a synthetic vector is exactly the same interpolation of the
two parent images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from imblearn.combine import SMOTEENN, SMOTETomek
from imblearn.over_sampling import ADASYN, SMOTE, BorderlineSMOTE, RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from tasks.artifacts import atomic_dir, write_json, write_npy
from tasks.data.datasets import Split, write_split
from tasks.data.pixels import ChannelStats
from tasks.orchestration import stage_task
from tasks.params import ResampleParams

# strategy -> (params, seed, k_neighbors actually usable) -> sampler; None: no sampler
SAMPLERS: dict[str, Callable[[ResampleParams, int, int], Any] | None] = {
    "none": None,
    "balanced_sampler": None,
    "random_over": lambda p, seed, k: RandomOverSampler(
        sampling_strategy=p.sampling_strategy, random_state=seed
    ),
    "random_under": lambda p, seed, k: RandomUnderSampler(
        sampling_strategy=p.sampling_strategy, random_state=seed
    ),
    "smote": lambda p, seed, k: SMOTE(
        sampling_strategy=p.sampling_strategy, k_neighbors=k, random_state=seed
    ),
    "borderline_smote": lambda p, seed, k: BorderlineSMOTE(
        sampling_strategy=p.sampling_strategy, k_neighbors=k, random_state=seed
    ),
    "adasyn": lambda p, seed, k: ADASYN(
        sampling_strategy=p.sampling_strategy, n_neighbors=k, random_state=seed
    ),
    "smote_tomek": lambda p, seed, k: SMOTETomek(
        sampling_strategy=p.sampling_strategy,
        smote=SMOTE(sampling_strategy=p.sampling_strategy, k_neighbors=k, random_state=seed),
        random_state=seed,
    ),
    "smote_enn": lambda p, seed, k: SMOTEENN(
        sampling_strategy=p.sampling_strategy,
        smote=SMOTE(sampling_strategy=p.sampling_strategy, k_neighbors=k, random_state=seed),
        random_state=seed,
    ),
}
# Samplers that synthesise images from neighbours and so need feature vectors.
NEEDS_FEATURES = {"smote", "borderline_smote", "adasyn", "smote_tomek", "smote_enn"}


def build_sampler(params: ResampleParams, seed: int, k_neighbors: int | None = None) -> Any:
    """The imbalanced-learn sampler ``resample.strategy`` names (None: no sampler)."""
    if params.strategy not in SAMPLERS:
        raise ValueError(
            f"resample.strategy: unknown sampler {params.strategy!r}; "
            f"valid choices: {', '.join(SAMPLERS)}"
        )
    factory = SAMPLERS[params.strategy]
    k = params.k_neighbors if k_neighbors is None else k_neighbors
    return None if factory is None else factory(params, seed, k)


def usable_k(k_neighbors: int, counts: list[int]) -> int:
    """SMOTE's neighbours come from within a class: at most (smallest class - 1)."""
    smallest = min(c for c in counts if c > 0)
    if smallest < 2:
        raise ValueError(
            f"a class has {smallest} train image: SMOTE-like samplers need at least 2 per "
            "class (use random_over or balanced_sampler, or lower data.imbalance_ratio)"
        )
    return min(k_neighbors, smallest - 1)


def feature_matrix(
    images: np.ndarray, embeddings: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Rows to resample, and the scale of the pixel columns in them.

    Pixel space: the pixels themselves (scale 1). Embedding space: the
    embedding, then the pixels times ``eps`` so small that they add at most
    1e-8 to any squared distance (standardised embeddings are O(1) apart):
    neighbours are decided by the embedding, and interpolation carries the
    pixels along exactly (float64 keeps them to ~1e-13 of a grey level).
    """
    pixels = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    if embeddings is None:
        return pixels, 1.0
    eps = 1e-4 / (255.0 * np.sqrt(pixels.shape[1]))
    return np.hstack([embeddings, pixels * eps]), eps


@dataclass(frozen=True)
class Resampled:
    """Which train rows to use (repeats allowed), any synthetic images, per-row weights."""

    indices: np.ndarray
    synthetic: Split
    weights: np.ndarray  # sampling weight of each resampled row (uniform but for balanced)
    counts_before: list[int]
    counts_after: list[int]  # per epoch, in expectation for balanced_sampler
    k_neighbors: int | None = None  # neighbours actually used by a SMOTE-like sampler
    strategy_used: str | None = None  # where it differs from resample.strategy (a fallback)
    warnings: tuple[str, ...] = ()


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row weights that make every class equally likely in a weighted draw."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = 1.0 / counts[labels]
    return weights * len(labels) / weights.sum()


def _split_output(
    sampler: Any, resampled_x: np.ndarray, resampled_y: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original rows kept, synthetic feature rows, synthetic labels) of a fitted sampler."""
    if hasattr(sampler, "sample_indices_"):  # random over/under: rows of the input
        return np.asarray(sampler.sample_indices_, dtype=np.int64), resampled_x[:0], resampled_y[:0]
    cleaner = getattr(sampler, "tomek_", None) or getattr(sampler, "enn_", None)
    if cleaner is None:  # SMOTE-like: the originals in order, then what it made
        return np.arange(n), resampled_x[n:], resampled_y[n:]
    # SMOTE + cleaning: the cleaner kept these rows of SMOTE's output, in order.
    kept = np.asarray(cleaner.sample_indices_, dtype=np.int64)
    synthetic = kept >= n
    return kept[~synthetic], resampled_x[synthetic], resampled_y[synthetic]


@stage_task(name="resample")
def resample(
    train: Split,
    num_classes: int,
    params: ResampleParams,
    seed: int,
    stats: ChannelStats | None = None,
) -> Resampled:
    """Apply ``resample.strategy`` to the train split; keep originals by index, not by copy."""
    n, *shape = train.images.shape
    empty = Split(np.empty((0, *shape), np.uint8), np.empty(0, np.int64))
    before = train.class_counts(num_classes)
    if params.strategy == "balanced_sampler":
        expected = [round(n / num_classes)] * num_classes
        return Resampled(
            np.arange(n), empty, balanced_weights(train.labels, num_classes), before, expected
        )
    k = usable_k(params.k_neighbors, before) if params.strategy in NEEDS_FEATURES else None
    sampler = build_sampler(params, seed, k)
    if sampler is None:
        return Resampled(np.arange(n), empty, np.ones(n), before, before)

    if params.strategy in NEEDS_FEATURES:
        embeddings = None
        if params.space == "embeddings":
            from tasks.data.embeddings import build_embedder, embed

            if stats is None:
                raise ValueError("resample.space: embeddings needs the train channel stats")
            embedder = build_embedder(params.embedding_checkpoint, shape[-1], seed)
            embeddings = embed(np.asarray(train.images), stats, embedder)
        features, scale = feature_matrix(train.images, embeddings)
    else:
        # Random samplers pick rows and never look at features: give them row numbers
        # instead of a float copy of every pixel (4.9 GB for 100k 64x64 RGB images).
        features, scale = np.arange(n, dtype=np.float64)[:, None], 1.0
    used, warnings = params.strategy, ()
    try:
        try:
            resampled_x, resampled_y = sampler.fit_resample(features, train.labels)
        except (ValueError, RuntimeError) as exc:
            if params.strategy != "adasyn" or not _adasyn_undefined(exc):
                raise
            # ADASYN weights each minority sample by the share of other classes among
            # its neighbours; where no neighbour is of another class those weights are
            # 0/0 and uniform weights - which is SMOTE - are what ADASYN degenerates to.
            used = "smote"
            warnings = (
                f"resample.strategy='adasyn' is undefined on this train split ({exc}); "
                "fell back to SMOTE, what ADASYN degenerates to there",
            )
            sampler = build_sampler(params.model_copy(update={"strategy": used}), seed, k)
            resampled_x, resampled_y = sampler.fit_resample(features, train.labels)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"resample.strategy={params.strategy!r} failed on the train split "
            f"(class counts {before}; resample.sampling_strategy={params.sampling_strategy!r}, "
            f"resample.k_neighbors={params.k_neighbors}): {exc}"
        ) from None

    indices, synthetic_x, synthetic_y = _split_output(sampler, resampled_x, resampled_y, n)
    pixels = synthetic_x[:, -int(np.prod(shape)) :] / scale
    synthetic = Split(
        np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, *shape),
        np.asarray(synthetic_y, dtype=np.int64),
    )
    labels = np.concatenate([train.labels[indices], synthetic.labels])
    after = np.bincount(labels, minlength=num_classes).tolist()
    return Resampled(
        indices, synthetic, np.ones(len(labels)), before, after, k,
        used if used != params.strategy else None, warnings,
    )  # fmt: skip


ADASYN_UNDEFINED = ("Not any neigbours belong to the majority", "No samples will be generated")


def _adasyn_undefined(exc: Exception) -> bool:
    """Whether ``exc`` is imbalanced-learn's ADASYN saying its density ratios are undefined."""
    return any(message in str(exc) for message in ADASYN_UNDEFINED)


@stage_task(name="write-resampled")
def write(
    out_dir: Path,
    metrics_path: Path,
    result: Resampled,
    classes: tuple[str, ...],
    params: ResampleParams,
) -> dict:
    with atomic_dir(out_dir) as tmp:
        write_npy(tmp / "indices.npy", result.indices)
        write_npy(tmp / "weights.npy", result.weights)
        write_split(tmp / "synthetic", result.synthetic)
        write_json(tmp / "warnings.json", list(result.warnings))  # for the fits' MLflow runs
    metrics = {
        "strategy": params.strategy,
        "strategy_used": result.strategy_used or params.strategy,
        "warnings": list(result.warnings),
        "space": params.space if params.strategy in NEEDS_FEATURES else None,
        "k_neighbors": result.k_neighbors,
        "per_epoch": params.strategy == "balanced_sampler",
        "train_before": int(sum(result.counts_before)),
        "train_after": int(sum(result.counts_after)),
        "synthetic": len(result.synthetic),
        "class_counts_before": dict(zip(classes, result.counts_before, strict=True)),
        "class_counts_after": dict(zip(classes, result.counts_after, strict=True)),
    }
    write_json(metrics_path, metrics)
    return metrics
