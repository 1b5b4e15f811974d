"""Train stage: the teacher CNN, augmented on the fly, early-stopped on val macro-F1.

Run with ``dvc repro train`` (or ``python -m flows.train``). Reads ``seed``,
``train``, ``augment`` and ``mlflow.experiment``. Writes ``models/teacher.pt``
(a self-describing checkpoint), ``metrics/train.json`` and
``plots/train_curve.csv``. Uses CUDA when present (``train.device: auto``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from tasks.artifacts import write_csv, write_json
from tasks.checkpoints import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
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
    input_size_of,
    load_imagenet_weights,
    packaged_weights,
)
from tasks.models import PRETRAINED, InputView, build_model, count_params
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, FitParams, TrainParams
from tasks.training.device_data import DeviceBatches
from tasks.training.distributed import World, init_process_group
from tasks.training.engine import (
    EpochRecord,
    Finetune,
    FitResult,
    fit,
    make_loader,
    seed_everything,
    select_device,
    supervised_objective,
)
from tasks.training.losses import build_loss
from tasks.training.resume import Resume
from tasks.transforms import Augment, build_augment


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
) -> DataLoader:
    """The train DataLoader over ``split``: ``data.train``, or a relabelled view of it."""
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
    )


def initialise_from(model: nn.Module, checkpoint: Checkpoint, classes: tuple[str, ...]) -> bool:
    """Copy ``checkpoint``'s weights into ``model`` (transfer learning).

    The backbone must match exactly; the head is copied only when the classes
    are the same ones in the same order, else it keeps its fresh
    initialisation. Returns whether the head was copied.
    """
    source = checkpoint.state_dict
    keep_head = tuple(checkpoint.classes) == tuple(classes)
    wanted = {k: v for k, v in source.items() if keep_head or not k.startswith("head.")}
    target = model.state_dict()
    mismatched = [k for k, v in wanted.items() if k not in target or target[k].shape != v.shape] + [
        k for k in target if k.startswith("features.") and k not in wanted
    ]
    if mismatched:
        raise ValueError(
            f"train.init_from: the checkpoint ({checkpoint.model_name}, width "
            f"{checkpoint.width} x {checkpoint.width_multiplier}) does not fit train.model "
            f"with these params; first mismatches: {', '.join(mismatched[:5])}"
        )
    model.load_state_dict(wanted, strict=False)
    return keep_head


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
    )
    if params.pretrained:
        section = params.SECTION
        weights = params.weights or packaged_weights(section).path
        load_imagenet_weights(model, weights, section=section)
        log(f"{section}: {params.model} starts from the ImageNet weights in {weights}")
    return model


@stage_task(name="fit-teacher")
def fit_teacher(
    data: TrainingData,
    params: TrainParams,
    augment: AugmentParams,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    resume: Resume | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    seed_everything(seed, params.deterministic)
    device = init_process_group(World.from_env(), select_device(params.device))
    model = network_for(data, params, log)
    if params.init_from is not None:
        initial = load_checkpoint(resolve_checkpoint(params.init_from))
        head = initialise_from(model, initial, data.prepared.classes)
        log(f"train: initialised from {params.init_from} ({'its' if head else 'a fresh'} head)")
    finetune = Finetune(params.freeze_backbone_epochs, params.backbone_lr_mult)
    train_loader, val_loader = build_loaders(data, params, augment, seed, device)
    objective = supervised_objective(supervised_loss(params, data).to(device))
    return fit(
        model, objective, train_loader, val_loader, params, device, on_epoch, finetune, resume, log
    )


def fit_summary(result: FitResult) -> dict[str, float | int | bool]:
    """The numbers metrics/<stage>.json and the checkpoint carry about a fit."""
    return {
        "best_val_f1_macro": result.best_val_f1_macro,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "epochs_planned": result.epochs_planned,
        "stopped_early": result.stopped_early,
        "params": count_params(result.model),
        "fit_seconds": round(result.seconds, 3),
        "images_per_second": round(
            sum(r.images_per_second for r in result.history) / len(result.history), 1
        ),
    }


@stage_task(name="write-model")
def write_model(
    result: FitResult,
    data: TrainingData,
    params: FitParams,
    run_params: dict[str, Any],
    checkpoint_path: Path,
    metrics_path: Path,
    curve_path: Path,
    mlflow_run_id: str | None,
    extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Checkpoint (with params, classes and stats embedded), metrics and the learning curve."""
    summary = {**fit_summary(result), **(extra or {})}
    height, _, channels = data.prepared.image_shape
    save_checkpoint(
        checkpoint_path,
        Checkpoint(
            model_name=params.model,
            width=params.width,
            width_multiplier=params.width_multiplier,
            dropout=params.dropout,
            in_channels=channels,
            image_size=height,
            classes=data.prepared.classes,
            stats=data.prepared.stats,
            params=run_params,
            metrics={k: float(v) for k, v in summary.items() if isinstance(v, int | float)},
            state_dict=result.model.state_dict(),
            mlflow_run_id=mlflow_run_id,
            class_prior=tuple(data.class_prior),
            preprocessing=data.prepared.preprocessing,
            input_size=input_size_of(result.model),
        ),
    )
    write_csv(curve_path, [asdict(record) for record in result.history])
    write_json(metrics_path, summary)
    return summary


def describe_epoch(record: EpochRecord) -> str:
    return (
        f"epoch {record.epoch} train_loss={record.train_loss:.4f} "
        f"val_loss={record.val_loss:.4f} val_f1_macro={record.val_f1_macro:.4f} "
        f"lr={record.lr:.2e} {record.images_per_second:.0f} img/s"
    )


def augment_artifacts(
    data: TrainingData, augment: AugmentParams, seed: int, out_dir: Path, per_class: int = 2
) -> list[Path]:
    """``augment.yaml`` (the exact pipelines) and ``augment_grid.png`` (what the model sees).

    The grid shows ``per_class`` train images of each class: the stored image
    first, then six augmented draws of it.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    pipeline = train_augment(data, augment, seed)
    spec = out_dir / "augment.yaml"
    spec.write_text(yaml.safe_dump(pipeline.to_dict(), sort_keys=False))

    labels = np.asarray(data.train.labels)
    rows = [
        i for c in range(data.prepared.num_classes) for i in np.flatnonzero(labels == c)[:per_class]
    ]
    draws = 6
    figure = Figure(figsize=(1.1 * (draws + 1), 1.1 * len(rows)))
    axes = figure.subplots(len(rows), draws + 1, squeeze=False)
    for r, index in enumerate(rows):
        image = np.asarray(data.train.images[index])
        label = int(labels[index])
        shown = [image] + [pipeline(image, label) for _ in range(draws)]
        for column, picture in enumerate(shown):
            axis = axes[r, column]
            axis.imshow(picture.squeeze(), cmap="gray" if picture.shape[-1] == 1 else None)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r, 0].set_ylabel(data.prepared.classes[label], fontsize=7)
    axes[0, 0].set_title("stored", fontsize=7)
    figure.tight_layout(pad=0.2)
    grid = out_dir / "augment_grid.png"
    figure.savefig(grid, dpi=80)
    return [spec, grid]
