"""The train stage's helpers: what the model sees per epoch, its loss, its augmentation
record, and transfer learning (init_from, a frozen backbone, a slower backbone)."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.data.datasets import PreparedData, Split
from tasks.data.resample import balanced_weights
from tasks.models import build_model
from tasks.params import Params
from tasks.training.engine import Finetune, _optimizer
from tasks.training.losses import FocalLoss
from tasks.training.train import (
    TrainingData,
    augment_artifacts,
    fit_teacher,
    initialise_from,
    supervised_loss,
)


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


def _checkpoint_of(model: torch.nn.Module, tiny: PreparedData, classes=None) -> Checkpoint:
    return Checkpoint(
        model_name="cnn", width=4, dropout=0.0, in_channels=1, image_size=8,
        classes=classes or tiny.classes, stats=tiny.stats, params={}, metrics={},
        state_dict=model.state_dict(),
    )  # fmt: skip


def test_initialise_from_copies_the_backbone_and_the_head_only_for_the_same_classes(
    tiny_prepared: PreparedData,
) -> None:
    torch.manual_seed(0)
    source = build_model("cnn", 1, 10, 4, 0.0)
    same = build_model("cnn", 1, 10, 4, 0.0)
    assert initialise_from(same, _checkpoint_of(source, tiny_prepared), tiny_prepared.classes)
    assert torch.equal(same.head[2].weight, source.head[2].weight)
    other = build_model("cnn", 1, 10, 4, 0.0)
    renamed = tuple(f"c{i}" for i in range(10))
    checkpoint = _checkpoint_of(source, tiny_prepared, renamed)
    assert not initialise_from(other, checkpoint, tiny_prepared.classes)
    assert torch.equal(other.features[0][0].weight, source.features[0][0].weight)
    assert not torch.equal(other.head[2].weight, source.head[2].weight)
    wider = build_model("cnn", 1, 10, 8, 0.0)
    with pytest.raises(ValueError, match=r"train\.init_from"):
        initialise_from(wider, _checkpoint_of(source, tiny_prepared), tiny_prepared.classes)


def test_fine_tuning_freezes_the_backbone_then_trains_it_slower(
    params: Params, tiny_prepared: PreparedData, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    pretrained = build_model("cnn", 1, 10, 4, 0.0)
    path = save_checkpoint(tmp_path / "pre.pt", _checkpoint_of(pretrained, tiny_prepared))
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    fixed = {"model": "cnn", "pretrained": False, "width": 4, "batch_size": 8, "device": "cpu",
             "dropout": 0.0, "min_steps": 0, "init_from": str(path),
             "backbone_lr_mult": 0.1}  # fmt: skip
    frozen = fit_teacher.fn(
        data, params.train.model_copy(update={**fixed, "epochs": 2, "freeze_backbone_epochs": 2}),
        params.augment, seed=0,
    )  # fmt: skip
    before = pretrained.state_dict()
    after = frozen.model.state_dict()
    # weights and BatchNorm running statistics of the backbone are untouched
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("features."))
    assert not torch.equal(before["head.2.weight"], after["head.2.weight"])
    thawed = fit_teacher.fn(
        data, params.train.model_copy(update={**fixed, "epochs": 2, "freeze_backbone_epochs": 1}),
        params.augment, seed=0,
    )  # fmt: skip
    moved = thawed.model.state_dict()["features.0.0.weight"]
    assert not torch.equal(before["features.0.0.weight"], moved)


def test_optimizer_gives_the_backbone_its_own_learning_rate(params: Params) -> None:
    model = build_model("cnn", 1, 10, 4, 0.0)
    optimizer = _optimizer(model, params.train, Finetune(backbone_lr_mult=0.1))
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.head[2].weight)] == pytest.approx(params.train.lr)
    assert lrs[id(model.features[0][0].weight)] == pytest.approx(params.train.lr * 0.1)
    assert len(lrs) == len(list(model.parameters()))
