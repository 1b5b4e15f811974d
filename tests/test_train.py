"""The train stage's helpers: what the model sees per epoch, its loss, its augmentation
record, and transfer learning (init_from, a frozen backbone, a slower backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.data.datasets import PreparedData
from tasks.models import build_model
from tasks.params import Params
from tasks.training.engine import Finetune, _optimizer
from tasks.training.inputs import TrainingData
from tasks.training.train import fit_teacher, initialise_from


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
