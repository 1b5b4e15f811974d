"""Trivial baselines, and the guard that refuses a model that does not beat them.

A CNN that learned nothing still finishes every stage green: its int8 copy is
small and fast, and only its scores give it away. So prepare measures what
learning nothing, or next to nothing, scores on the same splits:

- ``majority``: always the most frequent train class;
- ``linear``: multinomial logistic regression on the pixels, area-downsampled to
  ``LINEAR_SIDE`` x ``LINEAR_SIDE`` per channel and standardised with train statistics.

They are written to ``data/prepared/baselines.json`` (and ``metrics/prepare.json``).
Train and distill then call ``check_fit``: the best val macro-F1 must close at least
``baseline_margin`` of the gap between the better baseline and a perfect 1.0, or
the stage fails with ``WeakModelError`` saying what to try, unless ``allow_weak``,
which turns the failure into a warning recorded in the metrics and the MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import read_json, write_json
from tasks.data.datasets import PreparedData
from tasks.metrics import f1_macro

BASELINES_FILE = "baselines.json"  # inside data/prepared/
LINEAR_SIDE = 8  # the linear baseline sees 8x8 pixels per channel
LINEAR_MAX_ROWS = 20_000  # train rows the linear model fits on at most (a seeded sample)
CHUNK = 4096


def downsample(images: np.ndarray, side: int = LINEAR_SIDE) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, side * side * C) in [0, 1], by area averaging.

    Each output pixel is the mean of its block of input pixels (blocks differ in
    size by at most one where ``H`` is not a multiple of ``side``).
    """
    n, height, width, _ = images.shape
    rows = np.linspace(0, height, min(side, height) + 1).astype(int)
    cols = np.linspace(0, width, min(side, width) + 1).astype(int)
    area = np.outer(np.diff(rows), np.diff(cols))[None, :, :, None]
    out = []
    for start in range(0, n, CHUNK):
        block = np.asarray(images[start : start + CHUNK], dtype=np.float32)
        summed = np.add.reduceat(np.add.reduceat(block, rows[:-1], axis=1), cols[:-1], axis=2)
        out.append((summed / area / 255.0).reshape(len(block), -1))
    return np.concatenate(out) if out else np.zeros((0, side * side), np.float32)


def _scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "f1_macro": round(f1_macro(labels, predicted, num_classes), 6),
        "accuracy": round(float((predicted == labels).mean()), 6),
    }


def trivial_baselines(data: PreparedData, seed: int) -> dict[str, Any]:
    """``{"majority": {"val": {...}, "test": {...}}, "linear": {...}, "best": name}``.

    Scores are macro-F1 and accuracy on val and test; ``best`` is the baseline
    with the higher val macro-F1, the one a model must beat.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    k = data.num_classes
    train_labels = np.asarray(data.train.labels)
    majority = int(np.bincount(train_labels, minlength=k).argmax())
    rows = np.arange(len(train_labels))
    if len(rows) > LINEAR_MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, LINEAR_MAX_ROWS, replace=False))
    pixels = downsample(np.asarray(data.train.images)[rows])
    scaler = StandardScaler().fit(pixels)
    linear = LogisticRegression(max_iter=500, C=1.0).fit(
        scaler.transform(pixels), train_labels[rows]
    )
    result: dict[str, Any] = {"majority": {}, "linear": {}}
    for name in ("val", "test"):
        split = getattr(data, name)
        labels = np.asarray(split.labels)
        result["majority"][name] = _scores(labels, np.full_like(labels, majority), k)
        features = scaler.transform(downsample(np.asarray(split.images)))
        result["linear"][name] = _scores(labels, linear.predict(features), k)
    result["linear"]["pixels"] = f"{LINEAR_SIDE}x{LINEAR_SIDE}"
    result["best"] = max(("majority", "linear"), key=lambda b: result[b]["val"]["f1_macro"])
    result["num_classes"] = k
    return result


def write_baselines(directory: Path, baselines: dict[str, Any]) -> None:
    write_json(directory / BASELINES_FILE, baselines)


def read_baselines(directory: Path) -> dict[str, Any]:
    path = directory / BASELINES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-run the prepare stage (dvc repro prepare)")
    return read_json(path)


class WeakModelError(RuntimeError):
    """A fitted model does not beat the trivial baselines by the required margin."""


@dataclass(frozen=True)
class BaselineCheck:
    """A fit's best val macro-F1 against the better trivial baseline."""

    baseline: str  # majority | linear
    baseline_val_f1_macro: float
    required_val_f1_macro: float
    val_f1_macro: float

    @property
    def weak(self) -> bool:
        return self.val_f1_macro < self.required_val_f1_macro

    def metrics(self) -> dict[str, float | str | bool]:
        """What metrics/<stage>.json and the MLflow run record of the check."""
        return {
            "baseline": self.baseline,
            "baseline_val_f1_macro": self.baseline_val_f1_macro,
            "required_val_f1_macro": round(self.required_val_f1_macro, 6),
            "weak": self.weak,
        }


def check_fit(
    stage: str,
    val_f1_macro: float,
    baselines: dict[str, Any],
    margin: float,
    allow_weak: bool,
    warn: Any = print,
) -> BaselineCheck:
    """Fail (``WeakModelError``) if ``val_f1_macro`` does not close ``margin`` of the gap
    from the better baseline to 1.0; with ``allow_weak``, ``warn`` instead."""
    best = baselines["best"]
    floor = float(baselines[best]["val"]["f1_macro"])
    check = BaselineCheck(best, floor, floor + margin * (1.0 - floor), float(val_f1_macro))
    if not check.weak:
        return check
    k = int(baselines["num_classes"])
    model_key = "train.model" if stage == "train" else "distill.model"
    advice = (
        "train.pretrained: true with train.model: efficientnet_lite0, a larger data.image_size "
        "or train.input_size, more train.epochs / train.min_steps"
        if stage == "train"
        else "distill.pretrained: true with distill.model: efficientnet_lite0_trunk, a "
        "stronger teacher, a larger distill.input_size, more distill.epochs / distill.min_steps"
    )
    message = (
        f"{stage}: the best val macro-F1 {check.val_f1_macro:.4f} does not beat the {best} "
        f"baseline ({floor:.4f} on the same val split, {k} classes, chance about {1 / k:.2f}) "
        f"by {stage}.baseline_margin {margin} of the gap to 1.0 (needs >= "
        f"{check.required_val_f1_macro:.4f}): this {model_key} learned next to nothing "
        f"that the baseline does not. Try {advice}; or set {stage}.allow_weak: true to ship "
        "it anyway, flagged as weak."
    )
    if not allow_weak:
        raise WeakModelError(message)
    warn(f"WEAK MODEL (allow_weak: true): {message}")
    return check
