"""The training engine the train and distill stages share.

Seeding in one function, device choice, a Dataset that augments on the fly,
and ``fit``: AdamW, a one-cycle or cosine schedule stepped per batch, early
stopping on validation macro-F1 with ``patience``, best weights restored.
What differs between teacher and student is only the ``Objective``.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from tasks.datasets import ChannelStats, Split
from tasks.metrics import f1_macro
from tasks.params import FitParams
from tasks.transforms import Augment, normalise

# (model, images, labels) -> (loss, logits). The teacher's is cross-entropy;
# the student's adds the frozen teacher's soft targets.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; make kernels deterministic if asked.

    DataLoader workers and albumentations are seeded from the same seed by
    ``make_loader`` (through its generator and ``_seed_worker``).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (CUDA docs).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def select_device(name: str) -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


class ImageDataset(Dataset):
    """uint8 images -> (augmented) normalised CHW float tensors, one at a time."""

    def __init__(self, split: Split, stats: ChannelStats, augment: Augment | None = None):
        self.images = split.images
        self.labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
        self.stats = stats
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(self.images[index])
        if self.augment is not None:
            image = self.augment(image, int(self.labels[index]))
        return torch.from_numpy(normalise(image, self.stats)), self.labels[index]


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker a distinct seed derived from the loader's
    # generator; pass it on so augmentation differs across workers yet repeats
    # across runs.
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    if info.dataset.augment is not None:
        info.dataset.augment.set_random_seed(seed)


def make_loader(
    split: Split,
    stats: ChannelStats,
    batch_size: int,
    *,
    seed: int,
    train: bool = False,
    augment: Augment | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    weights: np.ndarray | None = None,
) -> DataLoader:
    """A loader over ``split``; ``train`` shuffles and drops a last partial batch.

    With unequal ``weights`` (``resample.strategy: balanced_sampler``) a train
    epoch is ``len(split)`` draws with replacement, row ``i`` drawn with
    probability proportional to ``weights[i]``: rebalanced per epoch, no copies.
    """
    dataset = ImageDataset(split, stats, augment if train else None)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and weights is not None and not np.allclose(weights, weights[0]):
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        # BatchNorm cannot train on a batch of one.
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers else None,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def supervised_objective(loss: nn.Module) -> Objective:
    """The teacher's objective: ``loss`` (cross-entropy, weighted or focal) on its logits."""

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        return loss(logits, labels), logits

    return objective


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_f1_macro: float
    lr: float
    seconds: float
    images_per_second: float


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


def _scheduler(optimizer: torch.optim.Optimizer, params: FitParams, total_steps: int):
    if params.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps
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


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: DataLoader,
    val_loader: DataLoader,
    params: FitParams,
    device: torch.device,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    finetune: Finetune | None = None,
) -> FitResult:
    """Train ``model`` with ``objective``; stop when val macro-F1 stalls for ``patience`` epochs.

    The best epoch is the one with the highest val macro-F1, ties going to the
    lower val loss (small val sets saturate F1 early). ``finetune`` freezes the
    backbone for its first epochs and gives it a lower learning rate.
    """
    finetune = finetune or Finetune()
    model.to(device)
    backbone = getattr(model, "features", None)
    optimizer = _optimizer(model, params, finetune)
    scheduler = _scheduler(optimizer, params, params.epochs * len(train_loader))
    best_key = (-1.0, float("-inf"))
    best_state, best_epoch, best_loss, stale = None, 0, float("inf"), 0
    history: list[EpochRecord] = []
    started = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        model.train()
        frozen = backbone is not None and epoch <= finetune.freeze_epochs
        if backbone is not None:
            backbone.requires_grad_(not frozen)
            if frozen:
                backbone.eval()
        epoch_start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (images, labels) in enumerate(train_loader, start=1):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = objective(model, images, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}: "
                    "lower the learning rate or turn on grad_clip"
                )
            loss.backward()
            if params.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            scheduler.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
        train_seconds = time.perf_counter() - epoch_start
        val_loss, val_accuracy, val_f1 = _validate(model, val_loader, device)
        record = EpochRecord(
            epoch=epoch,
            train_loss=loss_sum / max(seen, 1),
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            val_f1_macro=val_f1,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - epoch_start,
            images_per_second=seen / train_seconds if train_seconds > 0 else 0.0,
        )
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if (val_f1, -val_loss) > best_key:
            best_key = (val_f1, -val_loss)
            best_state = copy.deepcopy(model.state_dict())
            best_epoch, best_loss, stale = epoch, val_loss, 0
        elif not frozen:  # head-only epochs do not count towards patience
            stale += 1
            if stale >= params.patience:
                break
    model.load_state_dict(best_state)
    return FitResult(
        model=model,
        best_epoch=best_epoch,
        best_val_f1_macro=best_key[0],
        best_val_loss=best_loss,
        history=tuple(history),
        stopped_early=len(history) < params.epochs,
        seconds=time.perf_counter() - started,
    )
