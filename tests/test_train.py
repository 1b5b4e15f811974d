"""The train stage's helpers: what the model sees per epoch, its loss, its augmentation record."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.datasets import PreparedData, Split
from tasks.losses import FocalLoss
from tasks.params import Params
from tasks.resample import balanced_weights
from tasks.train import TrainingData, augment_artifacts, supervised_loss


def _long_tailed(tiny: PreparedData) -> Split:
    keep = np.r_[np.arange(30)[tiny.train.labels < 5], np.flatnonzero(tiny.train.labels == 9)[:1]]
    return Split(tiny.train.images[keep], tiny.train.labels[keep])


def test_class_prior_follows_the_sampling_weights(tiny_prepared: PreparedData) -> None:
    train = _long_tailed(tiny_prepared)  # classes 0-4: 3 images each, class 9: 1
    plain = TrainingData(tiny_prepared, train, np.ones(len(train)))
    assert plain.class_counts[:5] == pytest.approx([3.0] * 5)
    assert plain.class_counts[9] == pytest.approx(1.0)
    assert plain.class_prior[5:9] == [0.0] * 4
    balanced = TrainingData(tiny_prepared, train, balanced_weights(train.labels, 10))
    present = [p for p in balanced.class_prior if p > 0]
    assert present == pytest.approx([1 / 6] * 6)


def test_supervised_loss_weights_the_classes_the_model_sees(
    params: Params, tiny_prepared: PreparedData
) -> None:
    train = _long_tailed(tiny_prepared)
    data = TrainingData(tiny_prepared, train, np.ones(len(train)))
    loss = supervised_loss(params.train.model_copy(update={"class_weight": "balanced"}), data)
    assert isinstance(loss, torch.nn.CrossEntropyLoss)
    assert loss.weight[9] / loss.weight[0] == pytest.approx(3.0)
    focal = supervised_loss(params.train.model_copy(update={"loss": "focal"}), data)
    assert isinstance(focal, FocalLoss) and focal.gamma == params.train.focal_gamma


def test_augment_artifacts_record_the_pipeline_and_show_it(
    params: Params, tiny_prepared: PreparedData, tmp_path: Path
) -> None:
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    spec, grid = augment_artifacts(data, params.augment, seed=0, out_dir=tmp_path)
    recorded = yaml.safe_load(spec.read_text())
    pipeline = A.from_dict(recorded["all_classes"])  # albumentations reads its own format back
    assert [type(t).__name__ for t in pipeline.transforms] == ["Affine", "RandomBrightnessContrast"]
    assert recorded["minority_pipeline"] is None
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100
