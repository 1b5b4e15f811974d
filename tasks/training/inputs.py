"""What a fit starts from: its data, its batches, its network and its supervised loss.

``load_training_data`` reads the prepared splits and the resampled train split
(with its sample weights and the resample stage's warnings); ``build_loaders``
turns them into train batches (a DataLoader augmenting each image with
albumentations, or ``data_on_device`` batches) and a val loader;
``network_for`` builds ``params.model`` for the data, with its ImageNet weights
when ``pretrained``; ``supervised_loss`` the cross-entropy (weighted or focal)
the params ask for. Shared by the teacher (``train.py``) and the student
(``distill.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tasks.data.datasets import (
    PREPARED_DIR,
    RESAMPLED_DIR,
    PreparedData,
    Split,
    load_prepared,
    load_resample_warnings,
    load_resampled_train,
    load_sample_weights,
)
from tasks.efficientnet import (
    auto_input_size,
    load_imagenet_weights,
    packaged_weights,
)
from tasks.models import PRETRAINED, InputView, build_model
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, FitParams
from tasks.training.device_data import DeviceBatches
from tasks.training.distributed import World
from tasks.training.loaders import make_loader
from tasks.training.losses import build_loss
from tasks.training.transforms import Augment, build_augment


@dataclass(frozen=True)
class TrainingData:
    """The prepared splits, with the train split as the resample stage left it."""

    prepared: PreparedData
    train: Split
    weights: np.ndarray  # per-row sampling weights; unequal only for balanced_sampler
    resample_warnings: tuple[str, ...] = ()  # what the resample stage warned about

    @property
    def class_prior(self) -> list[float]:
        """The class frequencies the model sees per epoch (in expectation)."""
        mass = np.bincount(
            self.train.labels, weights=self.weights, minlength=self.prepared.num_classes
        )
        return (mass / mass.sum()).tolist()

    def describe(self) -> dict[str, Any]:
        """What identifies this training data cheaply: classes, statistics (sums over
        every train pixel), row count and hashes of the labels and sampling weights."""

        def digest(array: np.ndarray) -> str:
            return hashlib.blake2b(
                np.ascontiguousarray(array).tobytes(), digest_size=12
            ).hexdigest()

        return {
            "classes": list(self.prepared.classes),
            "stats": [list(self.prepared.stats.mean), list(self.prepared.stats.std)],
            "rows": len(self.train),
            "labels": digest(np.asarray(self.train.labels)),
            "weights": digest(self.weights),
        }

    @property
    def class_counts(self) -> list[float]:
        """Per-class counts a loss weighting should see: the prior times the epoch size."""
        return [p * len(self.train) for p in self.class_prior]


@stage_task(name="load-data")
def load_training_data(
    prepared_dir: Path = PREPARED_DIR, resampled_dir: Path = RESAMPLED_DIR
) -> TrainingData:
    prepared = load_prepared(prepared_dir)
    return TrainingData(
        prepared,
        load_resampled_train(prepared, resampled_dir),
        load_sample_weights(resampled_dir),
        load_resample_warnings(resampled_dir),
    )


def train_augment(data: TrainingData, augment: AugmentParams, seed: int) -> Augment:
    """The augmentation for this data: its channels, size and minority classes."""
    height, _, channels = data.prepared.image_shape
    return build_augment(augment, seed, channels, height, data.class_counts)


def supervised_loss(params: FitParams, data: TrainingData) -> nn.Module:
    """``loss`` with ``class_weight`` taken over the class counts the model sees per epoch."""
    return build_loss(
        params.loss,
        data.class_counts,
        class_weight=params.class_weight,
        beta=params.class_weight_beta,
        gamma=params.focal_gamma,
        label_smoothing=params.label_smoothing,
    )


def build_loaders(
    data: TrainingData, params: FitParams, augment: AugmentParams, seed: int, device: torch.device
) -> tuple[DataLoader | DeviceBatches, DataLoader]:
    """Augmented, shuffled (or class-balanced) train batches and a plain val loader.

    The train batches come from a DataLoader (albumentations per image, on the
    CPU) or, with ``data_on_device``, from the split held on ``device`` and
    augmented there in whole batches (``tasks/training/device_data.py``).
    """
    common = {"stats": data.prepared.stats, "batch_size": params.batch_size, "seed": seed}
    pin = device.type == "cuda"
    val = make_loader(data.prepared.val, pin_memory=pin, **common)
    if params.data_on_device:
        train = DeviceBatches(
            data.train,
            augment=augment,
            device=device,
            weights=data.weights,
            world=World.from_env(),
            class_counts=data.class_counts,
            **common,
        )
        return train, val
    augmentation = train_augment(data, augment, seed)
    return train_batches(data, data.train, params, augmentation, seed, device), val


def train_batches(
    data: TrainingData,
    split: Split,
    params: FitParams,
    augment: Augment | None,
    seed: int,
    device: torch.device,
    views: int = 0,
    view_labels: bool = False,
) -> DataLoader:
    """The train DataLoader over ``split``: ``data.train``, or a relabelled view of it; with
    ``views``, each row's fixed augmented views (``make_loader``)."""
    return make_loader(
        split,
        data.prepared.stats,
        params.batch_size,
        seed=seed,
        train=True,
        augment=augment,
        num_workers=params.num_workers,
        pin_memory=device.type == "cuda",
        weights=data.weights,
        world=World.from_env(),
        views=views,
        view_labels=view_labels,
    )


def pretrained_view(data: TrainingData, params: FitParams) -> InputView | None:
    """How a PRETRAINED network sees the data: at ``input_size``; None for the others."""
    if params.model not in PRETRAINED:
        return None
    height, _, channels = data.prepared.image_shape
    size = auto_input_size(height, params.input_size, channels)
    return InputView(data.prepared.stats, size)


def network_for(
    data: TrainingData, params: FitParams, log: Callable[[str], None] = print
) -> nn.Module:
    """``params.model`` for this data's channels and classes: freshly initialised, then
    with ``params.pretrained`` its ImageNet weights (the packaged file or ``weights``)."""
    model = build_model(
        params.model,
        data.prepared.image_shape[2],
        data.prepared.num_classes,
        params.width,
        params.dropout,
        params.width_multiplier,
        view=pretrained_view(data, params),
        trunk_blocks=params.trunk_blocks,
    )
    if params.pretrained:
        section = params.SECTION
        weights = params.weights or packaged_weights(section).path
        load_imagenet_weights(model, weights, section=section)
        log(f"{section}: {params.model} starts from the ImageNet weights in {weights}")
    return model
