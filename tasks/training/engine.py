"""The training loop the train and distill stages share: ``fit``; its step and epoch
(``TrainStep``, ``train_epoch``) are QAT's too (``tasks/export/qat.py``).

AdamW, a one-cycle or cosine schedule stepped per batch (``Budget``: enough
epochs for ``min_steps``), early stopping on validation macro-F1 with
``patience``, best weights restored; its whole state is one ``TrainState``
(``resume.py``), saved after every epoch. What differs between teacher and
student is only the ``Objective``. The batches come from ``loaders.py`` or
``device_data.py``, device and precision from ``hardware.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasks.metrics import f1_macro
from tasks.params import FitParams
from tasks.training.distributed import (
    World,
    all_reduce_sum,
    broadcast_buffers,
)
from tasks.training.hardware import Precision
from tasks.training.resume import EpochRecord, Resume, TrainState, discard, load_state, save_state

# (model, images, labels) -> (loss, logits). The teacher's is cross-entropy;
# the student's adds the frozen teacher's soft targets.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def supervised_objective(loss: nn.Module) -> Objective:
    """The teacher's objective: ``loss`` (cross-entropy, weighted or focal) on its logits."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        return loss(logits, labels), logits

    return objective


@dataclass(frozen=True)
class FitResult:
    """The model with its best weights loaded, and how it got there."""

    model: nn.Module
    best_epoch: int
    best_val_f1_macro: float
    best_val_loss: float
    history: tuple[EpochRecord, ...]
    stopped_early: bool
    seconds: float
    epochs_planned: int  # params.epochs, or more to reach min_steps (engine.Budget)
    # What the caller adds to the fit's metrics (the distill stage: its teacher passes)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finetune:
    """Transfer learning: train only the head for ``freeze_epochs`` epochs, then
    everything, the backbone (``model.features``) at ``lr * backbone_lr_mult``.

    While frozen, the backbone's BatchNorm layers stay in eval mode too, so
    the pretrained running statistics are not dragged towards the new data
    before its weights may follow.
    """

    freeze_epochs: int = 0
    backbone_lr_mult: float = 1.0


def _optimizer(model: nn.Module, params: FitParams, finetune: Finetune) -> torch.optim.Optimizer:
    """AdamW over four groups: head then backbone, each split into decayed and not.

    Decay weights only: shrinking BN scales and biases towards zero only hurts.
    The head comes first so ``param_groups[0]`` carries the headline lr.
    """
    backbone = {id(p) for p in getattr(model, "features", nn.Identity()).parameters()}
    groups = []
    for in_backbone, lr in ((False, params.lr), (True, params.lr * finetune.backbone_lr_mult)):
        chosen = [p for p in model.parameters() if (id(p) in backbone) == in_backbone]
        for decayed in (True, False):
            members = [p for p in chosen if (p.ndim > 1) == decayed]
            if members:
                decay = params.weight_decay if decayed else 0.0
                groups.append({"params": members, "weight_decay": decay, "lr": lr})
    return torch.optim.AdamW(groups, lr=params.lr)


ONECYCLE_WARMUP = 0.3  # OneCycleLR's pct_start: the share of steps spent raising the lr


@dataclass(frozen=True)
class Budget:
    """How long a fit may run and when it may stop early, in optimizer steps.

    ``epochs`` is ``params.epochs``, raised where a small split would otherwise
    give fewer than ``params.min_steps`` steps; early stopping may act only once
    both the warm-up (one-cycle's rising phase) and ``min_steps`` are behind it,
    so patience cannot run out while the learning rate is still climbing.
    """

    epochs: int
    steps_per_epoch: int
    earliest_stop_step: int

    @classmethod
    def of(cls, params: FitParams, steps_per_epoch: int) -> Budget:
        steps_per_epoch = max(steps_per_epoch, 1)
        epochs = max(params.epochs, -(-params.min_steps // steps_per_epoch))
        warmup = ONECYCLE_WARMUP * epochs * steps_per_epoch if params.schedule == "onecycle" else 0
        return cls(epochs, steps_per_epoch, max(params.min_steps, int(warmup)))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def may_stop_after(self, epoch: int) -> bool:
        return epoch * self.steps_per_epoch >= self.earliest_stop_step


def _scheduler(optimizer: torch.optim.Optimizer, params: FitParams, total_steps: int):
    if params.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=ONECYCLE_WARMUP,
        )
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"schedule: unknown {params.schedule!r}; valid choices: onecycle, cosine")


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    chunks = [model(images.to(device)).float().cpu() for images, _ in loader]
    return torch.cat(chunks).numpy()


def _validate(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, float, float]:
    logits = predict_logits(model, loader, device)
    labels = loader.dataset.labels.numpy()
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    predicted = logits.argmax(axis=1)
    accuracy = float((predicted == labels).mean())
    return loss, accuracy, f1_macro(labels, predicted, num_classes=logits.shape[1])


@dataclass(frozen=True)
class TrainStep:
    """One optimizer step, the same for every fit (teacher, student, QAT): move the batch,
    forward under autocast, refuse a non-finite loss, backward through the scaler,
    clip, step the optimizer and the per-batch schedule."""

    model: nn.Module  # the module whose parameters are clipped (``forward`` may wrap it)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    memory_format: torch.memory_format
    grad_clip: float
    hint: str = "lower the learning rate or turn on grad_clip"  # what to do about a NaN
    ema: AveragedModel | None = None  # updated from ``model`` after every step

    def __call__(self, forward: nn.Module, objective: Objective, images: torch.Tensor,
                 labels: torch.Tensor, where: str) -> torch.Tensor:  # fmt: skip
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, _ = objective(forward, images, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at {where}: {self.hint}")
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss


def train_epoch(
    step: TrainStep, forward: nn.Module, objective: Objective, loader: DataLoader,
    epoch: int, epochs: int, show: bool = False,
) -> tuple[float, int]:  # fmt: skip
    """One pass over ``loader``: (summed loss, images seen); a progress bar when ``show``."""
    start, seen, loss_sum = time.perf_counter(), 0, 0.0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{epochs}", unit="step",
               disable=not show, leave=False)  # fmt: skip
    for index, (images, labels) in enumerate(loader, start=1):
        loss = step(forward, objective, images, labels, f"epoch {epoch}, step {index}")
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        if not bar.disable:  # a terminal: no formatting per step otherwise
            bar.update()
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
    bar.close()
    return loss_sum, seen


def _place(model: nn.Module, device: torch.device) -> torch.memory_format:
    """Put ``model`` on ``device`` in the memory format its batches will have."""
    if device.type == "cpu":
        # Flush denormal floats (below ~1e-38) to zero. Augmented batches drive many
        # activation gradients into that range, where x86 arithmetic takes a slow
        # path: the same loop ran 1.5x slower on augmented than on clean batches.
        # Values that small change no result; a CPU-only, process-wide setting.
        torch.set_flush_denormal(True)
    channels_last = device.type in ("cuda", "cpu")
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model.to(device, memory_format=memory_format)
    return memory_format


def weight_ema(
    model: nn.Module, half_life_epochs: float, steps_per_epoch: int
) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics
    (torch's ``AveragedModel``), or None when ``half_life_epochs`` is 0.

    The decay per optimizer step is set so that a step's weight halves after
    ``half_life_epochs`` epochs, whatever the steps per epoch: a 2-step epoch of a
    tiny folder and a 200-step epoch average over the same share of the schedule.
    """
    if half_life_epochs <= 0:
        return None
    decay = 0.5 ** (1.0 / (half_life_epochs * max(steps_per_epoch, 1)))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _restore(state: TrainState, resume: Resume | None, epochs: int, log) -> None:
    """Load ``resume``'s saved state into ``state`` where there is a valid one."""
    if resume is None:
        return
    payload, why_not = load_state(resume)  # on every rank: rank 0 reads, all get it
    if payload is not None:
        state.restore(payload)
        log(f"resuming from {resume.path}: epoch {state.epoch} of {epochs} was "
            f"finished, continuing at epoch {state.epoch + 1}")  # fmt: skip
    elif why_not != "no saved state":
        log(f"not resuming from {resume.path}: {why_not}; starting over")


def _forward(model: nn.Module, params: FitParams, device: torch.device, world: World,
             finetune: Finetune) -> nn.Module:  # fmt: skip
    """What the training step calls: the model, in DDP across ranks, compiled if asked."""
    forward: nn.Module = model
    if world.distributed:  # after the restore: DDP starts every rank from rank 0's weights
        forward = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # a frozen backbone produces no gradients for DDP to wait for
            find_unused_parameters=finetune.freeze_epochs > 0,
        )
    return torch.compile(forward) if params.compile else forward


def _begin_epoch(model: nn.Module, epoch: int, finetune: Finetune, sampler: Any) -> bool:
    """Train mode, the backbone frozen (weights and BN statistics) while ``finetune`` says;
    whether it is."""
    model.train()
    backbone = getattr(model, "features", None)
    frozen = backbone is not None and epoch <= finetune.freeze_epochs
    if backbone is not None:
        backbone.requires_grad_(not frozen)
        if frozen:
            backbone.eval()
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return frozen


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: DataLoader,
    val_loader: DataLoader,
    params: FitParams,
    device: torch.device,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    finetune: Finetune | None = None,
    resume: Resume | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` with ``objective``; stop when val macro-F1 stalls for ``patience`` epochs
    (never before the warm-up and ``min_steps`` are done: ``Budget``).

    The best epoch is the one with the highest val macro-F1, ties going to the
    lower val loss (small val sets saturate F1 early). With ``params.ema_half_life``
    the model validated, selected and returned is an exponential moving average of
    the weights (``weight_ema``), not the last step's: one lucky epoch on a small val
    split weighs less. ``finetune`` freezes the
    backbone for its first epochs and gives it a lower learning rate.

    Batches and weights are channels_last on CUDA (what tensor-core
    convolutions want) and on the CPU (oneDNN's NHWC kernels trained 1.4x
    faster here than NCHW: ``benchmarks/train_throughput.py``); copies are
    non-blocking from pinned memory; ``params.precision`` turns on autocast (and
    loss scaling for fp16) on any device; ``params.compile`` runs the training
    forward through ``torch.compile``. With ``resume``, the whole training state
    is saved atomically after every epoch and a re-run continues from it
    (``tasks/training/resume.py``).
    """
    finetune, world = finetune or Finetune(), World.from_env()
    if world.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all ranks
    memory_format = _place(model, device)
    precision = Precision.of(params.precision, device)
    optimizer = _optimizer(model, params, finetune)
    budget = Budget.of(params, len(train_loader))
    if budget.epochs > params.epochs:
        log(f"{len(train_loader)} steps per epoch: {budget.epochs} epochs instead of "
            f"{params.epochs}, for the {params.min_steps} optimizer steps of "
            "min_steps")  # fmt: skip
    scheduler = _scheduler(optimizer, params, budget.total_steps)
    ema = weight_ema(model, params.ema_half_life, budget.steps_per_epoch)
    step = TrainStep(model, optimizer, scheduler, precision.scaler(), precision, device,
                     memory_format, params.grad_clip, ema=ema)  # fmt: skip
    augment = getattr(getattr(train_loader, "dataset", None), "augment", None)
    state = TrainState(model, optimizer, scheduler, step.scaler, train_loader.generator, augment,
                       ema=ema)  # fmt: skip
    judged = model if ema is None else ema.module  # what is validated, selected and kept
    _restore(state, resume, budget.epochs, log)
    forward = _forward(model, params, device, world, finetune)
    show = sys.stderr.isatty() and world.is_main
    started = time.perf_counter() - state.seconds
    for epoch in range(state.epoch + 1, budget.epochs + 1):
        if state.stopped:
            break
        frozen = _begin_epoch(model, epoch, finetune, getattr(train_loader, "sampler", None))
        epoch_start = time.perf_counter()
        loss_sum, seen = train_epoch(step, forward, objective, train_loader, epoch,
                                     budget.epochs, show)  # fmt: skip
        loss_sum, seen = all_reduce_sum([loss_sum, seen], device)  # over every rank's shard
        train_seconds = time.perf_counter() - epoch_start
        broadcast_buffers(judged)  # every rank validates rank 0's model: same early stop
        with precision.autocast():
            val_loss, val_accuracy, val_f1 = _validate(judged, val_loader, device)
        record = EpochRecord(
            epoch=epoch, train_loss=loss_sum / max(seen, 1), val_loss=val_loss,
            val_accuracy=val_accuracy, val_f1_macro=val_f1, lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - epoch_start,
            images_per_second=seen / train_seconds if train_seconds > 0 else 0.0,
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(record)
        state.finish_epoch(record, not frozen, params.patience, budget.may_stop_after(epoch),
                           keep_last=params.keep == "last")  # fmt: skip
        state.seconds = time.perf_counter() - started
        if resume is not None:
            save_state(resume, state)  # every rank: rank 0 gathers their generators and writes
    model.load_state_dict(state.best_weights)
    discard(resume)  # rank 0's file
    return FitResult(
        model=model, best_epoch=state.best_epoch, best_val_f1_macro=state.best_key[0],
        best_val_loss=state.best_loss, history=tuple(state.history),
        stopped_early=len(state.history) < budget.epochs, epochs_planned=budget.epochs,
        seconds=time.perf_counter() - started,
    )  # fmt: skip
