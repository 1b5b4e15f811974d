"""What a fit starts from: the class prior of the resampled split, the loss weights it implies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data.datasets import PreparedData, Split
from tasks.data.resample import balanced_weights
from tasks.params import Params
from tasks.training.inputs import TrainingData, supervised_loss
from tasks.training.losses import FocalLoss


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


def _long_tailed(tiny: PreparedData) -> Split:
    keep = np.r_[np.arange(30)[tiny.train.labels < 5], np.flatnonzero(tiny.train.labels == 9)[:1]]
    return Split(tiny.train.images[keep], tiny.train.labels[keep])
