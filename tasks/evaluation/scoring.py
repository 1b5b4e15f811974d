"""The evaluation maths, on arrays: per-class scores, calibration, uncertainty, paired tests.

Everything here is a pure function of labels, predictions and probabilities,
and leans on scikit-learn and SciPy for the definitions (no hand-written
F1 or AUC). ``tasks/evaluation/evaluate.py`` runs the models and writes the results.

- ``classification_report``: per-class precision/recall/F1/support, the
  macro/weighted/micro averages, balanced and top-k accuracy, one-vs-rest
  ROC-AUC and PR-AUC.
- ``expected_calibration_error`` and ``fit_temperature`` (Guo et al., "On
  Calibration of Modern Neural Networks", ICML 2017).
- ``bootstrap_ci`` and ``paired_comparison`` (intervals, McNemar's test) live
  in ``tasks/metrics.py``: distill uses them too, and training sits below
  evaluation.
- ``delta_confusion``: which (actual, predicted) cells a compression step
  moved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from tasks.metrics import f1_macro


def classification_report(
    labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], top_k: int
) -> dict[str, Any]:
    """Every score of one variant on one split; per-class values keyed by class name."""
    everything = np.arange(len(classes))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=everything, zero_division=0
    )

    def per_class(values: np.ndarray) -> dict[str, float]:
        return {name: float(v) for name, v in zip(classes, values, strict=True)}

    onehot = np.eye(len(classes))[labels]
    present = onehot.sum(axis=0) > 0  # AUC is undefined for a class absent from the split
    k = min(top_k, len(classes))
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1_macro": f1_macro(labels, predicted, len(classes)),
        "f1_weighted": float(
            f1_score(labels, predicted, labels=everything, average="weighted", zero_division=0)
        ),
        "f1_micro": float(
            f1_score(labels, predicted, labels=everything, average="micro", zero_division=0)
        ),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        f"top{k}_accuracy": float(
            top_k_accuracy_score(labels, probs, k=k, labels=everything)
            if len(classes) > 2
            else accuracy_score(labels, predicted)
        ),
        "roc_auc_ovr": float(roc_auc_score(onehot[:, present], probs[:, present], average="macro")),
        "pr_auc_macro": float(
            average_precision_score(onehot[:, present], probs[:, present], average="macro")
        ),
        "f1_per_class": per_class(f1),
        "precision_per_class": per_class(precision),
        "recall_per_class": per_class(recall),
        "support_per_class": {name: int(s) for name, s in zip(classes, support, strict=True)},
    }


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Per confidence bin (equal width on [0, 1]): mean confidence, accuracy, count."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin i holds confidences in (i/bins, (i+1)/bins]; 0 joins the first bin
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    safe = np.maximum(count, 1)
    return {
        "confidence": np.bincount(index, weights=confidence, minlength=bins) / safe,
        "accuracy": np.bincount(index, weights=correct, minlength=bins) / safe,
        "count": count,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    r"""ECE: :math:`\sum_b \frac{|B_b|}{n}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
    over equal-width confidence bins (Naeini et al. 2015; Guo et al. 2017)."""
    table = reliability(probs, labels, bins)
    gap = np.abs(table["accuracy"] - table["confidence"])
    return float((table["count"] * gap).sum() / len(labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T).

    Fitted on the validation split, applied to the test split: it changes
    confidence, never the predicted class (Guo et al. 2017).
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def delta_confusion(
    labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray, num_classes: int
) -> np.ndarray:
    """Confusion counts of ``candidate`` minus those of ``reference`` (rows actual).

    A negative diagonal cell is a class the compression step costs; the
    positive cells in its row say what those images are now mistaken for.
    """
    everything = np.arange(num_classes)
    return confusion_matrix(labels, candidate, labels=everything).astype(
        np.int64
    ) - confusion_matrix(labels, reference, labels=everything).astype(np.int64)


def adjust_logits(logits: np.ndarray, prior: tuple[float, ...] | None, tau: float) -> np.ndarray:
    r"""Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit
    adjustment", ICLR 2021): :math:`f_c(x) - \tau \log \pi_c`.

    A model trained on a long-tailed prior :math:`\pi` is biased towards the
    head classes; subtracting :math:`\tau \log \pi` moves the decision
    thresholds towards the tail (``tau = 1`` is the Bayes-optimal correction for
    the balanced error). ``tau = 0`` or an unknown prior leaves the logits as they are.
    """
    if tau == 0.0 or prior is None:
        return logits
    log_prior = np.log(np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None))
    return (logits - tau * log_prior).astype(logits.dtype)
