"""Grad-CAM points at the evidence: a net trained where only one corner carries the class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.evaluation.gradcam import grad_cam, pick_examples, plot_grad_cam
from tests.toymodels import corner_data, trained_corner_model


def test_grad_cam_highlights_the_corner_that_carries_the_class() -> None:
    model = trained_corner_model()
    test, test_labels = corner_data(64, seed=1)
    with torch.no_grad():
        assert (model(test).argmax(1) == test_labels).float().mean() > 0.95

    positives = test[test_labels == 1]
    cams = grad_cam(model, positives, torch.ones(len(positives), dtype=torch.long))
    assert cams.shape == (len(positives), 16, 16)
    assert cams.min() >= 0.0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
    corner = cams[:, :8, :8].mean()
    others = [cams[:, :8, 8:].mean(), cams[:, 8:, :8].mean(), cams[:, 8:, 8:].mean()]
    assert corner > 2 * max(others)


def test_pick_examples_is_seeded_and_sorted_by_kind() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    predicted = np.array([0, 1, 1, 1, 0, 0, 0, 1])
    picked = pick_examples(labels, predicted, per_kind=3, seed=0)
    assert set(picked["misclassified"]) == {2, 5}  # fewer than asked: all of them
    assert len(picked["correct"]) == 3 and (labels == predicted)[picked["correct"]].all()
    assert np.array_equal(picked["correct"], pick_examples(labels, predicted, 3, 0)["correct"])


def test_plot_grad_cam_writes_a_png(tmp_path: Path) -> None:
    images = np.zeros((3, 8, 8, 1), np.uint8)
    path = plot_grad_cam(images, np.random.rand(3, 8, 8), ["a", "b", "c"], "t", tmp_path / "g.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
