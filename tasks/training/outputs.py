"""What a fit leaves behind: checkpoint, metrics, learning curve, and its augmentation shown.

``write_model`` writes the self-describing checkpoint, ``metrics/<stage>.json``
(``fit_summary`` and whatever the stage adds) and the per-epoch curve;
``augment_artifacts`` the exact augmentation pipelines and a grid of augmented
train images for the MLflow run. Shared by the train and distill stages
(through ``flows/fitting.py``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.artifacts import write_csv, write_json
from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.efficientnet import (
    input_size_of,
)
from tasks.models import count_params
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, FitParams
from tasks.training.engine import (
    EpochRecord,
    FitResult,
)
from tasks.training.inputs import (
    TrainingData,
    train_augment,
)


def fit_summary(result: FitResult) -> dict[str, Any]:
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
        **result.notes,
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
            trunk_blocks=params.trunk_blocks,
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
    cells = []  # per row: the stored image, then its draws
    for index in rows:
        image = np.asarray(data.train.images[index])
        cells.append([image] + [pipeline(image, int(labels[index])) for _ in range(draws)])
    mosaic = _mosaic(cells)
    # One image in one axis: a subplot per picture (140 for digits) took seconds to lay out.
    height, width = mosaic.shape[0] / len(rows), mosaic.shape[1] / (draws + 1)
    figure = Figure(figsize=(1.1 * (draws + 1), 1.1 * len(rows)))
    axis = figure.add_subplot()
    grey = mosaic.shape[-1] == 1
    axis.imshow(mosaic[..., 0] if grey else mosaic, cmap="gray" if grey else None,
                vmin=0, vmax=255, interpolation="nearest")  # fmt: skip
    axis.set_xticks([width / 2], ["stored"], fontsize=7)
    axis.xaxis.tick_top()
    axis.set_yticks(
        [height * (r + 0.5) for r in range(len(rows))],
        [data.prepared.classes[int(labels[index])] for index in rows],
        fontsize=7,
    )
    axis.tick_params(length=0)
    figure.tight_layout(pad=0.2)
    grid = out_dir / "augment_grid.png"
    figure.savefig(grid, dpi=80)
    return [spec, grid]


def _mosaic(cells: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of HWC uint8 images tiled into one image, ``gap`` white pixels between them.

    Each tile is as large as the largest image (an augmentation may change the size);
    smaller ones sit in its top-left corner.
    """
    height = max(image.shape[0] for row in cells for image in row)
    width = max(image.shape[1] for row in cells for image in row)
    channels = cells[0][0].shape[2]
    step_y, step_x = height + gap, width + gap
    mosaic = np.full((len(cells) * step_y - gap, len(cells[0]) * step_x - gap, channels), 255,
                     dtype=np.uint8)  # fmt: skip
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            y, x = r * step_y, c * step_x
            mosaic[y : y + image.shape[0], x : x + image.shape[1]] = image
    return mosaic
