"""Train and eval loaders: seeded with workers, partial batches, balanced draws, batched reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data.datasets import PreparedData, Split
from tasks.data.pixels import ChannelStats
from tasks.params import Params
from tasks.training.loaders import ImageDataset, make_loader
from tasks.training.transforms import build_augment


@pytest.mark.integration
def test_loader_with_workers_repeats_for_a_seed(
    params: Params, tiny_prepared: PreparedData
) -> None:
    train = Split(tiny_prepared.train.images[:16], tiny_prepared.train.labels[:16])

    def epochs(seed: int, augment: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_loader(
            train,
            tiny_prepared.stats,
            batch_size=4,
            seed=seed,
            train=True,
            augment=build_augment(params.augment, seed, size=8) if augment else None,
            num_workers=2,
        )
        return [tuple(map(torch.cat, zip(*loader, strict=True))) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first[0][0].shape == (16, 1, 8, 8)
    for (images, labels), (images_again, labels_again) in zip(first, again, strict=True):
        assert torch.equal(images, images_again)
        assert torch.equal(labels, labels_again)
    assert not torch.equal(first[0][0], first[1][0])  # a new epoch: new order, new draws
    assert not torch.equal(first[0][0], other[0][0])
    # Same seed without augmentation: same order (same labels), different pixels, so
    # the workers really did augment.
    plain = epochs(0, augment=False)
    assert torch.equal(plain[0][1], first[0][1])
    assert not torch.equal(plain[0][0], first[0][0])


def test_train_loader_drops_partial_batch_and_eval_loader_keeps_order(
    tiny_prepared: PreparedData,
) -> None:
    split, stats = tiny_prepared.train, tiny_prepared.stats  # 30 images
    train_loader = make_loader(split, stats, batch_size=8, seed=0, train=True)
    assert [len(labels) for _, labels in train_loader] == [8, 8, 8]
    eval_loader = make_loader(split, stats, batch_size=8, seed=0)
    labels = torch.cat([labels for _, labels in eval_loader])
    assert labels.tolist() == split.labels.tolist()


def test_balanced_weights_draw_every_class_equally_often(tiny_prepared: PreparedData) -> None:
    from tasks.data.resample import balanced_weights

    labels = np.repeat(np.arange(3), [60, 30, 6])
    split = Split(np.zeros((len(labels), 8, 8, 1), np.uint8), labels)
    weights = balanced_weights(labels, 3)

    def drawn(seed: int) -> torch.Tensor:
        loader = make_loader(
            split, tiny_prepared.stats, batch_size=32, seed=seed, train=True, weights=weights
        )
        epochs = []
        for epoch in range(20):
            loader.sampler.set_epoch(epoch)  # fit does this: a fresh draw per epoch
            epochs.append(torch.cat([y for _, y in loader]))
        return torch.cat(epochs)

    counts = torch.bincount(drawn(0), minlength=3).double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.03  # 20 epochs of 96 draws
    assert torch.equal(drawn(0), drawn(0))
    # equal weights: plain shuffling, every row exactly once per epoch
    loader = make_loader(split, tiny_prepared.stats, 16, seed=0, train=True, weights=np.ones(96))
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(labels.tolist())


def test_batched_dataset_reads_what_one_image_at_a_time_reads(params: Params) -> None:
    """__getitems__ (what the DataLoader calls) = stacked __getitem__, augmentation included."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(20, 8, 8, 1), dtype=np.uint8)
    split = Split(images, np.arange(20) % 4)
    stats = ChannelStats.of(images)
    rows = [7, 3, 3, 19, 0]
    one, batched = (
        ImageDataset(split, stats, build_augment(params.augment, seed=5, channels=1, size=8))
        for _ in range(2)
    )
    singles = [one[i] for i in rows]
    images_batch, labels_batch = batched.__getitems__(rows)
    torch.testing.assert_close(images_batch, torch.stack([image for image, _ in singles]))
    assert labels_batch.tolist() == [int(label) for _, label in singles] == [3, 3, 3, 3, 0]
