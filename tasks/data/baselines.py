"""Trivial baselines, and the guard that refuses a model that does not beat them.

A CNN that learned nothing still finishes every stage green: its int8 copy is
small and fast, and only its scores give it away. So prepare measures what
learning nothing, or next to nothing, scores on the same splits:

- ``majority``: always the most frequent train class;
- ``linear``: multinomial logistic regression on the pixels, area-downsampled to
  ``LINEAR_SIDE`` x ``LINEAR_SIDE`` per channel and standardised with train statistics.

They are written to ``data/prepared/baselines.json`` (and ``metrics/prepare.json``).
Train and distill then call ``check_fit``, which asks two things of the kept checkpoint:

- **a margin**: its val macro-F1 must close at least ``baseline_margin`` of the gap
  between the better baseline and a perfect 1.0;
- **significance**: it was chosen as the best of ``looks`` checkpoints (one per epoch)
  on the same val images it is judged on, and the best of many noisy looks at a
  small split clears any fixed margin by luck (six classes of pure noise, 36 val
  images, 150 epochs: val macro-F1 0.27 against a linear baseline of 0.11). So its
  val accuracy must also beat what any label-blind predictor can expect, the share
  of the largest val class, in a one-sided binomial test whose p-value, multiplied
  by ``looks`` (Bonferroni), is below ``significance``. Bonferroni holds whatever
  the dependence between epochs, so the chance that a model which learned nothing
  passes is at most ``significance``; a model that learned something passes with
  a p-value many orders of magnitude smaller on any val split of a few dozen images.

A fit that fails either fails its stage with ``WeakModelError`` saying what to try,
unless ``allow_weak``, which turns the failure into a warning recorded in the metrics
and the MLflow run.
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
    """A fitted model does not beat the trivial baselines by the required margin, or not
    significantly."""


@dataclass(frozen=True)
class Selection:
    """The kept checkpoint's val scores, and what it was chosen from."""

    f1_macro: float
    accuracy: float
    val_size: int
    label_blind_accuracy: float  # the share of the largest val class
    looks: int  # checkpoints compared on val to choose it (one per epoch)

    @classmethod
    def of(cls, f1_macro: float, accuracy: float, val_labels: np.ndarray, looks: int) -> Selection:
        counts = np.bincount(np.asarray(val_labels, dtype=np.int64))
        size = int(counts.sum())
        return cls(float(f1_macro), float(accuracy), size, float(counts.max() / size), looks)

    @property
    def correct(self) -> int:
        return round(self.accuracy * self.val_size)

    def p_value(self) -> float:
        """One-sided binomial test of the val accuracy against the label-blind share,
        times ``looks`` (Bonferroni), at most 1."""
        from scipy.stats import binom

        single = float(binom.sf(self.correct - 1, self.val_size, self.label_blind_accuracy))
        return min(1.0, single * max(self.looks, 1))


@dataclass(frozen=True)
class BaselineCheck:
    """A fit's kept checkpoint against the better trivial baseline and against luck."""

    baseline: str  # majority | linear
    baseline_val_f1_macro: float
    required_val_f1_macro: float
    selection: Selection
    significance: float

    @property
    def p_value(self) -> float:
        return self.selection.p_value()

    @property
    def below_margin(self) -> bool:
        return self.selection.f1_macro < self.required_val_f1_macro

    @property
    def not_significant(self) -> bool:
        return self.p_value >= self.significance

    @property
    def weak(self) -> bool:
        return self.below_margin or self.not_significant

    def metrics(self) -> dict[str, float | str | bool | int]:
        """What metrics/<stage>.json and the MLflow run record of the check."""
        return {
            "baseline": self.baseline,
            "baseline_val_f1_macro": self.baseline_val_f1_macro,
            "required_val_f1_macro": round(self.required_val_f1_macro, 6),
            "val_size": self.selection.val_size,
            "label_blind_val_accuracy": round(self.selection.label_blind_accuracy, 6),
            "selection_looks": self.selection.looks,
            "guard_p_value": float(f"{self.p_value:.3g}"),
            "weak": self.weak,
        }


def _advice(stage: str) -> str:
    if stage == "train":
        return (
            "train.pretrained: true with train.model: efficientnet_lite0, a larger "
            "data.image_size or train.input_size, more train.epochs / train.min_steps"
        )
    return (
        "distill.pretrained: true with distill.model: efficientnet_lite0_trunk, a stronger "
        "teacher, a larger distill.input_size, more distill.epochs / distill.min_steps"
    )


def _margin_message(stage: str, check: BaselineCheck, margin: float, k: int) -> str:
    model_key = "train.model" if stage == "train" else "distill.model"
    return (
        f"{stage}: the best val macro-F1 {check.selection.f1_macro:.4f} does not beat the "
        f"{check.baseline} baseline ({check.baseline_val_f1_macro:.4f} on the same val split, "
        f"{k} classes, chance about {1 / k:.2f}) by {stage}.baseline_margin {margin} of the gap "
        f"to 1.0 (needs >= {check.required_val_f1_macro:.4f}): this {model_key} learned next "
        f"to nothing that the baseline does not. Try {_advice(stage)}"
    )


def _significance_message(stage: str, check: BaselineCheck) -> str:
    chosen = check.selection
    return (
        f"{stage}: the kept checkpoint's val accuracy {chosen.accuracy:.4f} ({chosen.correct} "
        f"of {chosen.val_size} val images) is not significantly above "
        f"{chosen.label_blind_accuracy:.4f}, what always answering the largest val class "
        f"scores: one-sided binomial test, p-value times the {chosen.looks} checkpoints it was "
        f"chosen from (Bonferroni) = {check.p_value:.3g}, not below {stage}.significance "
        f"{check.significance}. Its val macro-F1 {chosen.f1_macro:.4f} is the best of "
        f"{chosen.looks} looks at {chosen.val_size} images: selection, not evidence of "
        "learning. Check that the class folders hold what their names say (labels that carry "
        "no information cannot be learned), give each class more images (a larger val split "
        f"judges better), or try {_advice(stage)}"
    )


def check_fit(
    stage: str,
    selection: Selection,
    baselines: dict[str, Any],
    margin: float,
    significance: float,
    allow_weak: bool,
    warn: Any = print,
) -> BaselineCheck:
    """Fail (``WeakModelError``) if the kept checkpoint does not close ``margin`` of the gap
    from the better baseline to 1.0, or does not beat a label-blind guess at
    ``significance`` after the correction for its looks; with ``allow_weak``, ``warn``."""
    best = baselines["best"]
    floor = float(baselines[best]["val"]["f1_macro"])
    required = floor + margin * (1.0 - floor)
    check = BaselineCheck(best, floor, required, selection, significance)
    if not check.weak:
        return check
    k = int(baselines["num_classes"])
    reasons = [_margin_message(stage, check, margin, k)] if check.below_margin else []
    if check.not_significant:
        reasons.append(_significance_message(stage, check))
    message = "; ".join(reasons) + (
        f". Or set {stage}.allow_weak: true to ship it anyway, flagged as weak."
    )
    if not allow_weak:
        raise WeakModelError(message)
    warn(f"WEAK MODEL (allow_weak: true): {message}")
    return check
