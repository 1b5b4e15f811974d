"""Evaluate stage cores: metrics, latency, confusion outputs; and MLflow metric flattening."""

from __future__ import annotations

import csv
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
)

from tasks.evaluate import measure_latency, plot_confusion, write_confusion
from tasks.scoring import classification_report
from tasks.tracking import scalar_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("cat", "dog", "eel")
# Class "eel" is never predicted; "dog" is over-predicted.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 1, 1, 1, 1, 1])


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict:
    """The report for hard predictions: probability 0.9 on the predicted class."""
    probs = np.full((len(predicted), len(classes)), 0.1 / (len(classes) - 1))
    probs[np.arange(len(predicted)), predicted] = 0.9
    return classification_report(labels, probs, classes, top_k=2)


def test_metrics_golden_values() -> None:
    metrics = classification_metrics(LABELS, PREDICTED, CLASSES)
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
        metrics = classification_metrics(LABELS, PREDICTED, CLASSES)
    assert metrics["f1_per_class"]["eel"] == 0.0
    assert all(isinstance(value, float) for value in metrics["f1_per_class"].values())


def test_latency_on_a_trivial_function() -> None:
    latency = measure_latency(lambda x: x.sum(), np.ones((4, 1, 8, 8)), warmup=2, repeats=25)
    assert set(latency) == {"median_ms", "p95_ms"}
    assert 0 < latency["median_ms"] <= latency["p95_ms"]


def test_latency_is_per_image() -> None:
    def five_ms(batch: np.ndarray) -> None:
        time.sleep(0.005)

    latency = measure_latency(five_ms, np.ones((10, 1)), warmup=0, repeats=3)
    # 5 ms for a batch of 10 is at least 0.5 ms per image; far below the 5 ms per call.
    assert 0.5 <= latency["median_ms"] < 2.5


def test_latency_with_one_repeat() -> None:
    latency = measure_latency(lambda x: x, np.ones((1, 1)), warmup=0, repeats=1)
    assert latency["median_ms"] == latency["p95_ms"] > 0


def test_latency_p95_never_exceeds_the_slowest_call() -> None:
    durations = iter([0.010, 0.020, 0.030, 0.040, 0.050])

    def slower_each_call(batch: np.ndarray) -> None:
        time.sleep(next(durations))

    latency = measure_latency(slower_each_call, np.ones((1, 1)), warmup=0, repeats=5)
    # The slowest call took 50 ms plus scheduling overshoot; 'exclusive' gives ~57 ms.
    assert latency["p95_ms"] <= 53.0


@pytest.mark.parametrize(("num_classes", "min_side_px"), [(3, 480), (50, 2000)])
def test_plot_confusion_writes_png(tmp_path: Path, num_classes: int, min_side_px: int) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, size=(num_classes, num_classes))
    matrix[0] = 0  # a class with no test images: an empty row must not divide by zero
    classes = tuple(f"class_{i}" for i in range(num_classes))
    path = tmp_path / "confusion.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert plot_confusion(matrix, classes, "student (test)", path) == path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        width, height = image.size
    assert width == height >= min_side_px  # the figure grows with the class count


def test_write_confusion_csv_and_png(tmp_path: Path) -> None:
    classes = ("cat", "dog, large", "eel")  # a comma must survive the CSV round trip
    csv_path, png_path = write_confusion.fn("student", LABELS, PREDICTED, classes, tmp_path)
    assert csv_path == tmp_path / "student.csv"
    with csv_path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["actual", "predicted"]
    assert len(rows) == 1 + len(LABELS)
    assert rows[1:] == [[classes[a], classes[p]] for a, p in zip(LABELS, PREDICTED, strict=True)]
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_scalar_metrics_flattens_and_drops_non_numbers() -> None:
    metrics = {
        "f1_macro": 0.9,
        "params": 1234,
        "runtime": "onnxruntime-int8",
        "stopped_early": True,
        "note": None,
        "f1_per_class": {"T-shirt/top": 0.8, "Ankle boot": 0.7, "what?": 0.1},
        "student": {"latency": {"median_ms": 0.2, "unit": "ms"}},
    }
    assert scalar_metrics(metrics) == {
        "f1_macro": 0.9,
        "params": 1234.0,
        "stopped_early": 1.0,
        "f1_per_class.T-shirt/top": 0.8,
        "f1_per_class.Ankle boot": 0.7,
        "f1_per_class.what_": 0.1,  # characters MLflow rejects become "_"
        "student.latency.median_ms": 0.2,
    }
    assert all(isinstance(value, float) for value in scalar_metrics(metrics).values())


def test_logit_adjustment_moves_decisions_towards_rare_classes() -> None:
    from tasks.evaluate import adjust_logits

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
