"""Train stage: the teacher CNN, augmented on the fly, early-stopped on val macro-F1.

Run with ``dvc repro train`` (or ``python -m flows.train``). Reads ``seed``,
``train``, ``augment`` and ``mlflow.experiment``. Writes ``models/teacher.pt``
(a self-describing checkpoint), ``metrics/train.json`` and
``plots/train_curve.csv``. Uses CUDA when present (``train.device: auto``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from tasks.artifacts import write_csv, write_json
from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.datasets import (
    PREPARED_DIR,
    RESAMPLED_DIR,
    PreparedData,
    Split,
    load_prepared,
    load_resampled_train,
)
from tasks.engine import (
    EpochRecord,
    FitResult,
    cross_entropy_objective,
    fit,
    make_loader,
    seed_everything,
    select_device,
)
from tasks.models import build_model, count_params
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, FitParams, TrainParams
from tasks.transforms import build_augment


@dataclass(frozen=True)
class TrainingData:
    """The prepared splits, with the train split as the resample stage left it."""

    prepared: PreparedData
    train: Split


@stage_task(name="load-data")
def load_training_data(
    prepared_dir: Path = PREPARED_DIR, resampled_dir: Path = RESAMPLED_DIR
) -> TrainingData:
    prepared = load_prepared(prepared_dir)
    return TrainingData(prepared, load_resampled_train(prepared, resampled_dir))


def build_loaders(
    data: TrainingData, params: FitParams, augment: AugmentParams, seed: int, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    """Augmented, shuffled train loader and a plain val loader."""
    common = {"stats": data.prepared.stats, "batch_size": params.batch_size, "seed": seed}
    pin = device.type == "cuda"
    train = make_loader(
        data.train,
        train=True,
        augment=build_augment(augment, seed),
        num_workers=params.num_workers,
        pin_memory=pin,
        **common,
    )
    val = make_loader(data.prepared.val, pin_memory=pin, **common)
    return train, val


@stage_task(name="fit-teacher")
def fit_teacher(
    data: TrainingData,
    params: TrainParams,
    augment: AugmentParams,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    seed_everything(seed, params.deterministic)
    device = select_device(params.device)
    channels = data.prepared.image_shape[2]
    model = build_model(
        params.model, channels, data.prepared.num_classes, params.width, params.dropout
    )
    train_loader, val_loader = build_loaders(data, params, augment, seed, device)
    objective = cross_entropy_objective(params.label_smoothing)
    return fit(model, objective, train_loader, val_loader, params, device, on_epoch)


def fit_summary(result: FitResult) -> dict[str, float | int | bool]:
    """The numbers metrics/<stage>.json and the checkpoint carry about a fit."""
    return {
        "best_val_f1_macro": result.best_val_f1_macro,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
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
) -> dict[str, Any]:
    """Checkpoint (with params, classes and stats embedded), metrics and the learning curve."""
    summary = fit_summary(result)
    height, _, channels = data.prepared.image_shape
    save_checkpoint(
        checkpoint_path,
        Checkpoint(
            model_name=params.model,
            width=params.width,
            dropout=params.dropout,
            in_channels=channels,
            image_size=height,
            classes=data.prepared.classes,
            stats=data.prepared.stats,
            params=run_params,
            metrics={k: float(v) for k, v in summary.items()},
            state_dict=result.model.state_dict(),
            mlflow_run_id=mlflow_run_id,
        ),
    )
    write_csv(curve_path, [asdict(record) for record in result.history])
    write_json(metrics_path, summary)
    return summary


def describe_epoch(record: EpochRecord, epochs: int) -> str:
    return (
        f"epoch {record.epoch}/{epochs} train_loss={record.train_loss:.4f} "
        f"val_loss={record.val_loss:.4f} val_f1_macro={record.val_f1_macro:.4f} "
        f"lr={record.lr:.2e} {record.images_per_second:.0f} img/s"
    )
