"""Distill stage: a smaller student learns from the frozen teacher's soft targets and the labels.

Run with ``dvc repro distill`` (or ``python -m flows.distill``). Reads ``seed``,
``distill``, ``augment`` and ``mlflow.experiment``; needs ``models/teacher.pt``.
Writes ``models/student.pt``, ``metrics/distill.json`` and
``plots/distill_curve.csv``. The loss is ``tasks.training.losses.KDLoss``, plus
``AttentionTransferLoss`` with ``distill.feature_loss: attention``. Without
augmentation (and without a feature loss) the teacher's logits for the train
split are computed once rather than once per epoch.

With ``distill.compare_scratch`` the stage first trains the same student
*without* the teacher, from the same initial weights and in the same data
order (both fits call ``seed_everything(seed)`` before building the network
and loaders, and the teacher's forward pass draws no random numbers), so
``kd_gain`` = distilled minus scratch macro-F1 isolates what the teacher added.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tasks.checkpoints import Checkpoint, load_checkpoint
from tasks.data.datasets import Split
from tasks.metrics import f1_macro, paired_comparison
from tasks.models import Classifier
from tasks.orchestration import stage_task
from tasks.params import AugmentParams, DistillParams
from tasks.training.device_data import DeviceBatches
from tasks.training.distributed import World, init_process_group
from tasks.training.engine import (
    EpochRecord,
    FitResult,
    Objective,
    fit,
    predict_logits,
    supervised_objective,
)
from tasks.training.hardware import Precision, seed_everything, select_device
from tasks.training.inputs import (
    TrainingData,
    build_loaders,
    network_for,
    supervised_loss,
    train_augment,
    train_batches,
)
from tasks.training.loaders import make_loader
from tasks.training.losses import AttentionTransferLoss, KDLoss
from tasks.training.resume import Resume, fingerprint
from tasks.training.teacher_views import (
    TeacherViewCache,
    cache_dir,
    cached_teacher_logits,
    images_digest,
    weights_digest,
)
from tasks.training.transforms import Augment


class FeatureTaps:
    """Keeps the latest output of each tapped module (forward hooks); ``close`` removes them."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [
            module.register_forward_hook(self._keeper(i)) for i, module in enumerate(modules)
        ]

    def _keeper(self, index: int):
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[index] = output

        return keep

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def stage_ends(model: Classifier, input_shape: tuple[int, int, int]) -> dict[int, nn.Module]:
    """For each spatial resolution inside ``model.features``, the last block producing it.

    Found by a dry run on a zero image, so any architecture built as a
    ``Sequential`` of blocks works (resnet: 3 resolutions, cnn: 3, mobilenet: 3).
    """
    ends: dict[int, nn.Module] = {}
    x = torch.zeros(1, *input_shape)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for block in model.features:
            x = block(x)
            ends[x.shape[-1]] = block
    model.train(was_training)
    return ends


@contextmanager
def matched_taps(
    student: Classifier, teacher: Classifier, input_shape: tuple[int, int, int]
) -> Iterator[tuple[FeatureTaps, FeatureTaps]]:
    """Taps on student and teacher blocks at the resolutions both have, paired in order."""
    s_ends, t_ends = stage_ends(student, input_shape), stage_ends(teacher, input_shape)
    shared = sorted(set(s_ends) & set(t_ends), reverse=True)
    if not shared:
        raise ValueError(
            "distill.feature_loss: attention needs student and teacher feature maps at a "
            f"common resolution; student has {sorted(s_ends)}, teacher {sorted(t_ends)}"
        )
    taps = FeatureTaps([s_ends[r] for r in shared]), FeatureTaps([t_ends[r] for r in shared])
    try:
        yield taps
    finally:
        for tap in taps:
            tap.close()


def mix_batch(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup within a batch: ``lam * images + (1 - lam) * images[order]``, lam ~ Beta(alpha, alpha).

    Returns the mixed images, ``order`` and ``lam``. Drawn from Python's ``random``,
    which the resume state captures and nothing else in a fit draws from, so the
    scratch student's dropout and data order are untouched and a resumed fit mixes
    as an uninterrupted one would.
    """
    lam = random.betavariate(alpha, alpha)
    order = torch.tensor(random.sample(range(len(images)), len(images)), device=images.device)
    return lam * images + (1.0 - lam) * images[order], order, lam


def distillation_objective(
    teacher: nn.Module,
    loss: KDLoss,
    attention: AttentionTransferLoss | None = None,
    taps: tuple[FeatureTaps, FeatureTaps] | None = None,
    mixup: float = 0.0,
) -> Objective:
    """Student logits against the teacher's on the *same* augmented batch.

    With ``attention`` (and the ``taps`` that record both networks' feature
    maps) the attention-transfer term is added to the KD loss. With ``mixup``
    > 0 both networks see the batch mixed with itself (``mix_batch``): the student
    matches the teacher's function between images too ("function matching", Beyer
    et al. 2022), and the label term is mixed in the same proportion.
    """
    teacher.eval()
    teacher.requires_grad_(False)

    def objective(student: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        order, lam = None, 1.0
        if mixup > 0:
            images, order, lam = mix_batch(images, mixup)
        with torch.inference_mode():
            teacher_logits = teacher(images)
        # The KL term keeps these logits for its backward pass, which inference
        # tensors do not allow: a clone made outside inference mode is a normal tensor.
        teacher_logits = teacher_logits.clone()
        student_logits = student(images)
        total = loss(student_logits, teacher_logits, labels)
        if order is not None:
            # The soft term is the same for both label sets: only the hard term mixes.
            total = lam * total + (1.0 - lam) * loss(student_logits, teacher_logits, labels[order])
        if attention is not None and taps is not None:
            student_taps, teacher_taps = taps
            total = total + attention(student_taps.outputs, teacher_taps.outputs)
        return total, student_logits

    return objective


def cached_distillation_objective(
    teacher_logits: torch.Tensor, labels: torch.Tensor, loss: KDLoss
) -> Objective:
    """The KD objective over batches of VIEW NUMBERS, with every view's teacher logits known.

    Without augmentation a row's image, and so its teacher logits, are the
    same every epoch: the loader yields row numbers in place of labels. With
    ``distill.teacher_views`` it yields view numbers ``view * rows + row``
    (``teacher_views.py``). ``teacher_logits`` holds the logits of every view
    (computed once) and ``labels`` the rows' labels.
    """

    def objective(student: nn.Module, images: torch.Tensor, views: torch.Tensor):
        student_logits = student(images)
        rows = views % len(labels)
        return loss(student_logits, teacher_logits[views], labels[rows]), student_logits

    return objective


def _teacher_logits(teacher: nn.Module, loader: DataLoader, params: DistillParams,
                    device: torch.device) -> torch.Tensor:  # fmt: skip
    """The teacher's logits for ``loader``'s images, in order, under the training autocast."""
    with torch.inference_mode(), Precision.of(params.precision, device).autocast():
        return torch.from_numpy(predict_logits(teacher, loader, device))


def teacher_logits_once(
    teacher: nn.Module, data: TrainingData, params: DistillParams, device: torch.device
) -> torch.Tensor:
    """The teacher's logits for every train row, in row order, under the training autocast."""
    loader = make_loader(data.train, data.prepared.stats, params.batch_size, seed=0)
    return _teacher_logits(teacher, loader, params, device).to(device)


def teacher_view_logits(
    teacher: nn.Module, data: TrainingData, params: DistillParams, augment: Augment, seed: int,
    device: torch.device,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """The teacher's logits for ``params.teacher_views`` views of every train row, through the
    on-disk cache: (logits in view-number order, what the cache did, for the metrics)."""
    views = params.teacher_views
    loader = make_loader(data.train, data.prepared.stats, params.batch_size, seed=seed,
                         augment=augment, views=views)  # fmt: skip
    key = fingerprint({
        "teacher": weights_digest(teacher), "images": images_digest(data.train.images),
        "data": data.describe(), "augment": augment.to_dict(), "seed": seed, "views": views,
        "precision": params.precision, "device": device.type,
    })  # fmt: skip
    cache = TeacherViewCache(cache_dir(), int(params.teacher_view_cache_mb * 2**20))
    shape = (views * len(data.train), data.prepared.num_classes)
    return cached_teacher_logits(
        cache, key, shape, lambda: _teacher_logits(teacher, loader, params, device).numpy()
    )


@stage_task(name="load-teacher")
def load_teacher(path: Path) -> Checkpoint:
    return load_checkpoint(path)


def _student(
    data: TrainingData, params: DistillParams, seed: int, log: Callable[[str], None]
) -> nn.Module:
    """The student's initial weights: a function of ``seed`` (seeded just before) and, with
    ``distill.pretrained``, of the ImageNet weights."""
    seed_everything(seed, params.deterministic)
    return network_for(data, params, log)


@stage_task(name="fit-student")
def fit_student(
    data: TrainingData,
    teacher: Checkpoint | None,
    params: DistillParams,
    augment: AugmentParams,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    resume: Resume | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Fit the student; ``teacher=None`` trains it from scratch on the labels alone.

    Scratch and distilled fits build the same initial weights and draw the
    same batches in the same order, so their difference is the teacher's doing.
    """
    if teacher is not None and teacher.classes != data.prepared.classes:
        raise ValueError(
            "models/teacher.pt was trained on other classes than data/prepared holds: "
            "re-run the train stage (dvc repro train)"
        )
    device = init_process_group(World.from_env(), select_device(params.device))
    # Built before the student is seeded: rebuilding it draws random numbers
    # (its initialisation, overwritten by the checkpoint), which would
    # otherwise shift the student's dropout masks away from the scratch run's.
    network = teacher.build().to(device) if teacher is not None else None
    student = _student(data, params, seed, log)
    train_loader, val_loader = build_loaders(data, params, augment, seed, device)
    views = params.teacher_views
    if views > 0:  # both students see the same fixed views, in the same order
        augmentation = train_augment(data, augment, seed)
        train_loader = train_batches(data, data.train, params, augmentation, seed, device,
                                     views=views, view_labels=network is None)  # fmt: skip
    hard = supervised_loss(params, data).to(device)

    def run(
        objective: Objective,
        loader: DataLoader | DeviceBatches = train_loader,
        passes: Callable[[FitResult], float] = lambda _: 0.0,
        **notes: Any,
    ) -> FitResult:
        """The fit, with how many teacher forward passes it took per train image."""
        result = fit(student, objective, loader, val_loader, params, device, on_epoch,
                     resume=resume, log=log)  # fmt: skip
        passes_per_image = round(float(passes(result)), 3)
        return replace(result, notes={"teacher_passes_per_image": passes_per_image, **notes})

    if network is None:
        return run(supervised_objective(hard))
    kd = KDLoss(params.temperature, params.alpha, params.label_smoothing, hard=hard)
    labels = torch.as_tensor(np.asarray(data.train.labels), dtype=torch.long, device=device)
    if views > 0:
        logits, cache = teacher_view_logits(network, data, params, augmentation, seed, device)
        log(f"distill: the teacher's logits for {views} views of each train image: "
            f"cache {cache['cache']} ({cache['seconds']:.1f} s)")  # fmt: skip
        objective = cached_distillation_objective(torch.from_numpy(logits).to(device), labels, kd)
        passes = 0.0 if cache["cache"] == "hit" else float(views)
        return run(objective, passes=lambda _: passes, teacher_views=cache)
    # Device batches (data_on_device) have no dataset: they augment on the device,
    # so their teacher logits are always computed per batch.
    augmentation = getattr(getattr(train_loader, "dataset", None), "augment", None)
    unaugmented = augmentation is None or augmentation.is_identity
    fixed_views = unaugmented and params.mixup == 0
    if params.feature_loss == "none" and not params.data_on_device and fixed_views:
        # Every epoch shows the teacher the same images: one forward pass over the
        # split replaces one per epoch. Same sampler and seed, so the same batches.
        log("distill: no augmentation, so the teacher's logits are computed once")
        logits = teacher_logits_once(network, data, params, device)
        numbered = Split(data.train.images, np.arange(len(data.train)))
        rows = train_batches(data, numbered, params, None, seed, device)
        return run(cached_distillation_objective(logits, labels, kd), rows, lambda _: 1.0)
    every_epoch = len(train_loader) * params.batch_size / len(data.train)  # images shown / rows

    def per_batch(result: FitResult) -> float:
        return len(result.history) * every_epoch

    if params.feature_loss == "none":
        return run(distillation_objective(network, kd, mixup=params.mixup), passes=per_batch)
    height, _, channels = data.prepared.image_shape
    with matched_taps(student, network, (channels, height, height)) as taps:
        attention = AttentionTransferLoss(params.feature_weight)
        objective = distillation_objective(network, kd, attention, taps, params.mixup)
        return run(objective, passes=per_batch)


@dataclass(frozen=True)
class SplitScore:
    """Macro-F1 and accuracy of a fitted model on one split, and what it predicted there."""

    f1_macro: float
    accuracy: float
    labels: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)


def score(model: nn.Module, data: TrainingData, split: str, batch_size: int) -> SplitScore:
    """How ``model`` does on ``split`` of the prepared data (a report, never a selection)."""
    chosen = getattr(data.prepared, split)
    loader = make_loader(chosen, data.prepared.stats, batch_size, seed=0)
    device = next(model.parameters()).device
    predicted = predict_logits(model, loader, device).argmax(axis=1)
    labels = chosen.labels
    return SplitScore(
        f1_macro=f1_macro(labels, predicted, data.prepared.num_classes),
        accuracy=float((predicted == labels).mean()),
        labels=np.asarray(labels),
        predicted=predicted,
    )


def kd_gain(
    distilled: SplitScore, scratch: SplitScore, num_classes: int, samples: int, seed: int
) -> dict[str, Any]:
    """What distillation added over the same student trained on labels alone.

    ``kd_gain_ci`` is a paired bootstrap interval (``samples`` resamples of the
    test images, both students scored on each) and ``kd_gain_mcnemar_p`` the
    exact test on the images only one of them gets right: together they say
    whether the gain is larger than the luck of one test split.
    """
    if not np.array_equal(distilled.labels, scratch.labels):
        raise ValueError("kd_gain compares two students on the same split's images")
    paired = paired_comparison(
        distilled.labels, scratch.predicted, distilled.predicted, num_classes, samples, seed
    )
    return {
        "scratch_test_f1_macro": scratch.f1_macro,
        "scratch_test_accuracy": scratch.accuracy,
        "kd_gain": distilled.f1_macro - scratch.f1_macro,
        "kd_gain_ci": paired["f1_macro_delta_ci"],
        "kd_gain_mcnemar_p": paired["mcnemar_p"],
        "kd_gain_accuracy": distilled.accuracy - scratch.accuracy,
    }
