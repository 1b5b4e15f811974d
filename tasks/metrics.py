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
