"""Distill stage: a smaller student learns from the frozen teacher's soft targets and the labels.

Run with ``dvc repro distill`` (or ``python -m flows.distill``). Reads ``seed``,
``distill``, ``augment`` and ``mlflow.experiment``; needs ``models/teacher.pt``.
Writes ``models/student.pt``, ``metrics/distill.json`` and
``plots/distill_curve.csv``. The loss is ``tasks.losses.KDLoss``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.checkpoints import Checkpoint, load_checkpoint
from tasks.engine import EpochRecord, FitResult, Objective, fit, seed_everything, select_device
from tasks.losses import KDLoss
from tasks.models import build_model
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, DistillParams
from tasks.train import TrainingData, build_loaders, supervised_loss


def distillation_objective(teacher: nn.Module, loss: KDLoss) -> Objective:
    """Student logits against the teacher's on the *same* augmented batch."""
    teacher.eval()
    teacher.requires_grad_(False)

    def objective(student: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        # no_grad rather than inference_mode: the KL term keeps these logits
        # for its backward pass, which inference tensors do not allow.
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = student(images)
        return loss(student_logits, teacher_logits, labels), student_logits

    return objective


@stage_task(name="load-teacher")
def load_teacher(path: Path) -> Checkpoint:
    return load_checkpoint(path)


@stage_task(name="fit-student")
def fit_student(
    data: TrainingData,
    teacher: Checkpoint,
    params: DistillParams,
    augment: AugmentParams,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    if teacher.classes != data.prepared.classes:
        raise ValueError(
            "models/teacher.pt was trained on other classes than data/prepared holds: "
            "re-run the train stage (dvc repro train)"
        )
    seed_everything(seed, params.deterministic)
    device = select_device(params.device)
    student = build_model(
        params.model, teacher.in_channels, len(teacher.classes), params.width, params.dropout
    )
    train_loader, val_loader = build_loaders(data, params, augment, seed, device)
    hard = supervised_loss(params, data).to(device)
    kd = KDLoss(params.temperature, params.alpha, params.label_smoothing, hard=hard)
    objective = distillation_objective(teacher.build().to(device), kd)
    return fit(student, objective, train_loader, val_loader, params, device, on_epoch)
