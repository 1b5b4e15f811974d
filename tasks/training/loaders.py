"""Batches from a split held in memory: a Dataset that augments on the fly, and its DataLoader.

``ImageDataset`` normalises (and, for training, augments with albumentations)
each image; its ``__getitems__`` hands a whole batch over at once.
``make_loader`` shuffles, or draws class-balanced batches, through one seeded
``ShardedSampler`` (this rank's share under torchrun), and seeds each worker.
Used by ``inputs.py`` for the train and val batches of every fit.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.datasets import Split, take_rows
from tasks.data.pixels import ChannelStats, normalise
from tasks.training.distributed import (
    ShardedSampler,
    World,
    local_batch_size,
)
from tasks.training.teacher_views import ViewDataset, ViewSampler
from tasks.training.transforms import Augment


class ImageDataset(Dataset):
    """uint8 images -> (augmented) normalised CHW float tensors.

    The DataLoader asks for a whole batch through ``__getitems__``: one gather
    from the memory map, augmentation image by image in index order (the same
    draws, in the same order, as one ``__getitem__`` per image), then one
    vectorised normalisation and one tensor, instead of a normalisation, a
    tensor and a collate per image. On 16x16 digits that per-image work was
    about half of a CPU train step (``benchmarks/train_throughput.py``).
    """

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

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        images = take_rows(self.images, rows)
        labels = self.labels[torch.from_numpy(rows)]
        if self.augment is not None:
            pairs = zip(images, labels.tolist(), strict=True)
            images = np.stack([self.augment(image, label) for image, label in pairs])
        return torch.from_numpy(normalise(images, self.stats)), labels


def _batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate step: ``ImageDataset.__getitems__`` already built the batch."""
    return batch


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
    world: World | None = None,
    views: int = 0,
    view_labels: bool = False,
) -> DataLoader:
    """A loader over ``split``; ``train`` shuffles and drops a last partial batch.

    With unequal ``weights`` (``resample.strategy: balanced_sampler``) a train
    epoch is ``len(split)`` draws with replacement, row ``i`` drawn with
    probability proportional to ``weights[i]``: rebalanced per epoch, no copies.
    Under ``torchrun`` (``world``) a train loader yields this rank's shard of
    each global batch of ``batch_size`` (``tasks/training/distributed.py``).

    With ``views`` > 0 the images are ``augment``'s fixed views of each row
    (``tasks/training/teacher_views.py``) and the batches carry view numbers (or
    labels, ``view_labels``): a train loader shows each row one of its views per
    epoch; any other loader every view of every row, in order.
    """
    world = world or World()
    if views > 0:
        if augment is None:
            raise ValueError("views are views of an augmentation: pass augment")
        dataset = ViewDataset(split, stats, augment, views, seed, labels_out=view_labels)
    else:
        dataset = ImageDataset(split, stats, augment if train else None)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train:
        balanced = weights is not None and not np.allclose(weights, weights[0])
        sampler = ShardedSampler(len(split), seed, world, weights if balanced else None)
        if views > 0:
            sampler = ViewSampler(sampler, views, seed)
        batch_size = local_batch_size(batch_size, world)
        if dataset.augment is not None and world.rank > 0:
            augment.set_random_seed(seed + 7919 * world.rank)  # its own draws per rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # BatchNorm cannot train on a batch of one.
        drop_last=train and len(sampler or dataset) > batch_size,
        num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers else None,
        generator=generator,
        collate_fn=_batched,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
