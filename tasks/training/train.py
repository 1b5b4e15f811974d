"""Train stage: the teacher CNN, augmented on the fly, early-stopped on val macro-F1.

Run with ``dvc repro train`` (or ``python -m flows.train``). Reads ``seed``,
``train``, ``augment`` and ``mlflow.experiment``. Writes ``models/teacher.pt``
(a self-describing checkpoint), its ONNX export ``models/teacher.onnx``,
``metrics/train.json`` and ``plots/train_curve.csv``. Uses CUDA when present
(``train.device: auto``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from tasks.checkpoints import Checkpoint, load_checkpoint, resolve_checkpoint
from tasks.export.onnx_io import export_checkpoint
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, TrainParams
from tasks.training.distributed import World, init_process_group
from tasks.training.engine import EpochRecord, Finetune, FitResult, fit, supervised_objective
from tasks.training.hardware import seed_everything, select_device
from tasks.training.inputs import (
    TrainingData,
    build_loaders,
    network_for,
    supervised_loss,
)
from tasks.training.resume import Resume


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


@stage_task(name="export-teacher-onnx")
def export_teacher(checkpoint: Path, path: Path) -> Path:
    """The teacher in ONNX, once per teacher: the evaluate stage times it in ONNX Runtime
    and the registry registers it, without exporting it again (12-14 s for Lite0 on 2 cores)."""
    return export_checkpoint(load_checkpoint(checkpoint), path, variant="teacher")
