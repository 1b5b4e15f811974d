"""Evaluation maths against scikit-learn and against cases whose answer is known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from tasks.evaluation.scoring import (
    classification_report,
    delta_confusion,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from tasks.inference import probabilities
from tasks.metrics import bootstrap_ci, f1_macro, f1_macro_rows, paired_comparison
from tests.evaluations import LABELS, PREDICTED

CLASSES = ("a", "b", "c", "d")


def _dataset(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), labels] += 1.5  # informative but imperfect
    return labels, logits


def test_report_matches_scikit_learn() -> None:
    labels, logits = _dataset()
    probs = probabilities(logits)
    report = classification_report(labels, probs, CLASSES, top_k=2)
    onehot = np.eye(4)[labels]
    assert report["roc_auc_ovr"] == pytest.approx(roc_auc_score(onehot, probs, average="macro"))
    assert report["roc_auc_ovr"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert report["pr_auc_macro"] == pytest.approx(
        average_precision_score(onehot, probs, average="macro")
    )
    assert report["top2_accuracy"] == pytest.approx(top_k_accuracy_score(labels, probs, k=2))
    assert report["f1_micro"] == pytest.approx(report["accuracy"])  # single-label
    assert sum(report["support_per_class"].values()) == len(labels)


def test_ece_is_zero_for_a_perfectly_calibrated_model() -> None:
    # Every image gets confidence c for a class, and is right exactly a fraction c of the time.
    rng = np.random.default_rng(0)
    probs, labels = [], []
    for confidence in (0.35, 0.55, 0.75, 0.95):
        n = 2000
        right = rng.permutation(n) < round(confidence * n)
        rows = np.full((n, 2), 1.0 - confidence)
        rows[:, 0] = confidence
        probs.append(rows)
        labels.append(np.where(right, 0, 1))
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert expected_calibration_error(probs, labels, bins=10) < 1e-9
    # ...and is the confidence gap for an over-confident one
    overconfident = np.tile([0.99, 0.01], (len(labels), 1))
    accuracy = (labels == 0).mean()
    assert expected_calibration_error(overconfident, labels, 10) == pytest.approx(0.99 - accuracy)


def test_reliability_bins_count_every_image_once() -> None:
    labels, logits = _dataset()
    table = reliability(probabilities(logits), labels, bins=15)
    assert table["count"].sum() == len(labels)
    assert ((table["accuracy"] >= 0) & (table["accuracy"] <= 1)).all()


def test_temperature_scaling_cools_an_overconfident_model() -> None:
    labels, logits = _dataset(1)
    hot = logits * 4.0  # the same ranking, four times too confident
    temperature = fit_temperature(hot, labels)
    # the NLL optimum scales with the logits: T(4 z) = 4 T(z)
    assert temperature == pytest.approx(4.0 * fit_temperature(logits, labels), rel=1e-3)
    assert temperature > 2.0
    before = expected_calibration_error(probabilities(hot), labels)
    after = expected_calibration_error(probabilities(hot, temperature), labels)
    assert after < before / 2
    assert (probabilities(hot, temperature).argmax(1) == hot.argmax(1)).all()  # never the class


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_data() -> None:
    def accuracy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return np.mean(y == p, axis=-1)

    widths = []
    for n in (100, 1600):
        labels, logits = _dataset(2, n)
        predicted = logits.argmax(1)
        low, high = bootstrap_ci(labels, predicted, accuracy, samples=500, seed=0)
        assert low <= accuracy(labels, predicted) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) of it
    labels, logits = _dataset(2, 100)
    assert bootstrap_ci(labels, logits.argmax(1), accuracy, 200, seed=3) == bootstrap_ci(
        labels, logits.argmax(1), accuracy, 200, seed=3
    )


def test_identical_models_have_a_zero_delta_and_no_significant_difference() -> None:
    labels, logits = _dataset()
    predicted = logits.argmax(1)
    assert not delta_confusion(labels, predicted, predicted, 4).any()
    same = paired_comparison(labels, predicted, predicted, 4, samples=200, seed=0)
    assert same["f1_macro_delta"] == 0.0 and same["f1_macro_delta_ci"] == [0.0, 0.0]
    assert same["mcnemar_p"] == 1.0


def test_a_real_drop_is_significant_and_located_in_the_delta_matrix() -> None:
    labels, logits = _dataset(3, 800)
    reference = logits.argmax(1)
    candidate = reference.copy()
    lost = np.flatnonzero((labels == 2) & (reference == 2))[:60]
    candidate[lost] = 3  # the step forgets a third of class c, calling it d
    delta = delta_confusion(labels, reference, candidate, 4)
    assert delta[2, 2] == -60 and delta[2, 3] == 60
    assert delta.sum() == 0 and np.count_nonzero(delta) == 2
    step = paired_comparison(labels, reference, candidate, 4, samples=300, seed=0)
    assert step["f1_macro_delta"] == pytest.approx(
        f1_macro(labels, candidate, 4) - f1_macro(labels, reference, 4)
    )
    assert step["f1_macro_delta_ci"][1] < 0  # the whole interval is a loss
    assert step["only_reference_right"] == 60 and step["only_candidate_right"] == 0
    assert step["mcnemar_p"] < 1e-10


def test_f1_macro_of_many_resamples_at_once_is_f1_macro_of_each() -> None:
    labels, logits = _dataset(5, 60)
    predicted = logits.argmax(1)
    predicted[:4] = 3  # class d predicted where it is not
    idx = np.random.default_rng(0).integers(0, 60, (50, 60))
    idx[0] = np.flatnonzero(labels != 2)[0]  # a resample without class c at all: it scores 0
    rows = f1_macro_rows(labels[idx], predicted[idx], 4)
    expected = [f1_macro(labels[i], predicted[i], 4) for i in idx]
    assert rows == pytest.approx(expected, abs=1e-12)
    assert f1_macro_rows(labels, predicted, 4)[0] == pytest.approx(f1_macro(labels, predicted, 4))


PETS = ("cat", "dog", "eel")


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict:
    """The report for hard predictions: probability 0.9 on the predicted class."""
    probs = np.full((len(predicted), len(classes)), 0.1 / (len(classes) - 1))
    probs[np.arange(len(predicted)), predicted] = 0.9
    return classification_report(labels, probs, classes, top_k=2)


def test_metrics_golden_values() -> None:
    metrics = classification_metrics(LABELS, PREDICTED, PETS)
    # Per class: cat P=1 R=1/2 F1=2/3; dog P=2/5 R=1 F1=4/7; eel F1=0.
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 4 / 7 + 0) / 3)  # 26/63
    assert metrics["f1_weighted"] == pytest.approx(26 / 63)  # equal supports
    assert metrics["precision_macro"] == pytest.approx((1 + 2 / 5 + 0) / 3)
    assert metrics["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["f1_per_class"] == pytest.approx({"cat": 2 / 3, "dog": 4 / 7, "eel": 0.0})


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    metrics = classification_metrics(labels, predicted, ("a", "b", "c", "d"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    for key, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert metrics[f"{key}_macro"] == pytest.approx(score(labels, predicted, average="macro"))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    per_class = f1_score(labels, predicted, average=None)
    assert list(metrics["f1_per_class"].values()) == pytest.approx(per_class.tolist())
    assert list(metrics["f1_per_class"]) == ["a", "b", "c", "d"]


def test_never_predicted_class_is_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(LABELS, PREDICTED, PETS)
    assert metrics["f1_per_class"]["eel"] == 0.0
    assert all(isinstance(value, float) for value in metrics["f1_per_class"].values())


def test_logit_adjustment_moves_decisions_towards_rare_classes() -> None:
    from tasks.evaluation.scoring import adjust_logits

    logits = np.array([[2.0, 1.5], [0.2, 0.0]], dtype=np.float32)
    prior = (0.9, 0.1)
    assert adjust_logits(logits, prior, 0.0) is logits
    assert adjust_logits(logits, None, 1.0) is logits
    adjusted = adjust_logits(logits, prior, 1.0)
    np.testing.assert_allclose(adjusted, logits - np.log(prior), rtol=1e-6)
    assert adjusted.dtype == np.float32
    # the head class won both; after adjustment the close call goes to the rare class
    assert logits.argmax(axis=1).tolist() == [0, 0]
    assert adjusted.argmax(axis=1).tolist() == [1, 1]
