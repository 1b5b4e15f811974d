"""Metric definitions shared by every stage that scores a model, so "f1_macro" means one thing."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def f1_macro(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over every class, including one the model never predicts (it scores 0).

    Passing ``labels`` explicitly keeps train's early stopping, quantize's
    check and evaluate on the same definition; scikit-learn would otherwise
    average only over the classes present in the two arrays.
    """
    every_class = np.arange(num_classes)
    return float(f1_score(labels, predicted, labels=every_class, average="macro", zero_division=0))


def f1_macro_rows(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``f1_macro`` of each row of (S, n) ``labels`` and ``predicted`` at once: the same
    definition (a class with no true and no predicted image scores 0), from per-row
    counts instead of one scikit-learn call per row (1000 bootstrap resamples: 5 s -> 10 ms)."""
    labels, predicted = np.atleast_2d(labels), np.atleast_2d(predicted)
    rows = np.arange(len(labels))[:, None] * num_classes
    size = len(labels) * num_classes

    def counts(where: np.ndarray, classes: np.ndarray) -> np.ndarray:
        flat = (rows + classes)[where]
        return np.bincount(flat, minlength=size).reshape(len(labels), num_classes)

    right = labels == predicted
    tp = counts(right, labels)
    true = counts(np.ones_like(right), labels)  # tp + fn
    guessed = counts(np.ones_like(right), predicted)  # tp + fp
    denominator = true + guessed
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return f1.mean(axis=1)
