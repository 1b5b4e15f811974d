"""The evaluate stage's figures and DVC plot files: confusion matrices as PNG and CSV."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.evaluation.plots import plot_confusion, write_confusion
from tests.evaluations import LABELS, PREDICTED

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
