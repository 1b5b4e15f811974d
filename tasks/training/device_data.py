"""The train split held on the training device and augmented there, in whole batches.

``train.data_on_device: true`` (and ``distill.data_on_device``) replaces the
DataLoader for the train split: the uint8 images go to the device once (60k
28x28 Fashion-MNIST images are 47 MB), each batch is gathered there by index
and augmented with batched tensor ops, so a GPU is never waiting on CPU
workers decoding, augmenting and collating one image at a time. On the CPU it
removes the per-image Python work of albumentations as well
(``benchmarks/train_throughput.py`` measures both paths against a bare loop).

The batches are the DataLoader's batches: the same ``ShardedSampler`` (so the
same order, the same class-balanced draws and the same DDP shards) and the
same drop-last rule. The augmentation covers the ``augment:`` keys that are a
per-image geometric or intensity map, with albumentations' meaning on the
[0, 1] pixel scale: flips, Affine (rotation, translation, scale, shear, zero
fill), brightness/contrast, gamma, Gaussian noise and CoarseDropout, each with
its probability (times ``minority_boost`` for minority classes). Crop,
elastic, blur and hue/saturation are not implemented here: asking for them
with this path fails at once, naming the key. Random parameters are drawn on
the CPU from one seeded generator, then applied on the device, so a run
repeats on any device and resumes exactly (the generator is in the resume state).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional as F

from tasks.data.datasets import Split, take_rows
from tasks.data.pixels import ChannelStats
from tasks.params import DEVICE_UNSUPPORTED, AugmentParams
from tasks.training.distributed import ShardedSampler, World, local_batch_size
from tasks.training.transforms import minority_classes, resolve_augment


def check_supported(params: AugmentParams) -> None:
    """Fail fast, naming the key, when ``augment:`` asks for what this path cannot do.

    ``load_params`` already refuses such a params.yaml; this guards direct callers.
    """
    used = [key for key in DEVICE_UNSUPPORTED if getattr(params, key) > 0]
    if used:
        raise ValueError(
            f"data_on_device: true augments on the device, which has no {', '.join(used)}: "
            f"set augment.{used[0]} to 0 or data_on_device to false"
        )


def affine_theta(angle: torch.Tensor, shear: torch.Tensor, scale: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(N, 2, 3) ``affine_grid`` matrices with albumentations' Affine conventions.

    Rotate by ``angle`` degrees (counter-clockwise on screen), shear by
    ``shear`` (N, 2: x and y, degrees), scale by ``scale``, all about the
    centre, then translate by ``shift`` (N, 2: x, y as fractions of the width
    and height; albumentations rounds it to whole pixels, this does not).
    """
    angle = torch.deg2rad(-angle.float())  # pixel rows point down: screen CCW is negative here
    tan = torch.tan(torch.deg2rad(shear.float()))
    cos, sin, one = torch.cos(angle), torch.sin(angle), torch.ones_like(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    skew = torch.stack([torch.stack([one, -tan[:, 0]], -1), torch.stack([-tan[:, 1], one], -1)], -2)
    forward = skew @ rotate * scale.float()[:, None, None]
    # affine_grid maps each output pixel to where it samples the input: the inverse map.
    # A 2x2 inverse in closed form: torch.linalg.inv's batched LU cost 1.3 ms a batch of 256.
    (a, b), (c, d) = forward[:, 0].unbind(-1), forward[:, 1].unbind(-1)
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    inverse = inverse / (a * d - b * c)[:, None, None]
    return torch.cat([inverse, -(inverse @ (2 * shift.float())[:, :, None])], dim=2)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (N, C, H, W) ``images`` through ``theta``; zero outside, as Affine(fill=0)."""
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class TensorAugment:
    """Batched, per-image random augmentation of float images in [0, 1], (N, C, H, W)."""

    def __init__(self, params: AugmentParams, generator: torch.Generator,
                 minority: frozenset[int] = frozenset()) -> None:  # fmt: skip
        check_supported(params)
        self.params = params
        self.generator = generator
        self.minority = minority

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _chosen(self, p: float, labels: torch.Tensor) -> torch.Tensor:
        """Which images get a transform of probability ``p`` (boosted for minority classes)."""
        probability = torch.full((len(labels),), p)
        if self.minority and self.params.minority_boost != 1.0:
            boosted = torch.tensor([int(label) in self.minority for label in labels.tolist()])
            probability[boosted] = min(1.0, p * self.params.minority_boost)
        return torch.rand(len(labels), generator=self.generator) < probability

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, n, device = self.params, len(images), images.device
        if a.hflip_p > 0:
            flip = self._chosen(a.hflip_p, labels).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if a.vflip_p > 0:
            flip = self._chosen(a.vflip_p, labels).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-2), images)
        if a.affine_p > 0:
            images = self._affine(images, self._chosen(a.affine_p, labels))
        if a.brightness_contrast_p > 0:
            chosen = self._chosen(a.brightness_contrast_p, labels)
            alpha = 1 + self._uniform(n, -a.contrast_limit, a.contrast_limit)
            beta = self._uniform(n, -a.brightness_limit, a.brightness_limit)
            alpha, beta = torch.where(chosen, alpha, 1.0), torch.where(chosen, beta, 0.0)
            images = images * alpha.to(device)[:, None, None, None]
            images = (images + beta.to(device)[:, None, None, None]).clamp(0, 1)
        if a.gamma_p > 0:
            gamma = torch.where(self._chosen(a.gamma_p, labels),
                                self._uniform(n, a.gamma_min, a.gamma_max), 1.0)  # fmt: skip
            images = images.clamp_min(0) ** gamma.to(device)[:, None, None, None]
        if a.noise_p > 0:
            chosen = self._chosen(a.noise_p, labels)
            std = torch.where(chosen, self._uniform(n, 0, a.noise_std), 0.0)
            noise = torch.randn(images.shape, generator=self.generator) * std[:, None, None, None]
            images = (images + noise.to(device)).clamp(0, 1)
        if a.dropout_p > 0:
            images = self._dropout(images, self._chosen(a.dropout_p, labels))
        return images

    def _affine(self, images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        a, n = self.params, len(images)
        theta = affine_theta(
            angle=self._uniform(n, -a.rotate_deg, a.rotate_deg),
            shear=self._uniform(2 * n, -a.shear_deg, a.shear_deg).view(n, 2),
            scale=self._uniform(n, a.scale_min, a.scale_max),
            shift=self._uniform(2 * n, -a.translate_frac, a.translate_frac).view(n, 2),
        )
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
        return warp(images, torch.where(chosen[:, None, None], theta, identity))

    def _dropout(self, images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Up to ``dropout_holes`` zeroed rectangles per chosen image (CoarseDropout).

        The rectangles are drawn on the CPU (n numbers each), the (n, H, W) mask is
        built where the images are: on a GPU, building it on the CPU was a quarter of
        a step's host time.
        """
        a, (n, _, height, width), device = self.params, images.shape, images.device
        holes = torch.randint(1, a.dropout_holes + 1, (n,), generator=self.generator)
        boxes = []  # per hole: (n, 4) top, bottom, left, right; empty where no hole
        for hole in range(a.dropout_holes):
            h = (self._uniform(n, 0.05, a.dropout_size_frac) * height).round().clamp_min(1)
            w = (self._uniform(n, 0.05, a.dropout_size_frac) * width).round().clamp_min(1)
            top = (self._uniform(n, 0, 1) * (height - h + 1)).floor()
            left = (self._uniform(n, 0, 1) * (width - w + 1)).floor()
            active = chosen & (hole < holes)
            h, w = torch.where(active, h, 0.0), torch.where(active, w, 0.0)
            boxes.append(torch.stack([top, top + h, left, left + w], -1))
        top, bottom, left, right = torch.stack(boxes, 1).to(device).unbind(-1)  # (n, holes)
        rows = torch.arange(height, device=device, dtype=top.dtype)
        cols = torch.arange(width, device=device, dtype=top.dtype)
        in_rows = (rows >= top[..., None]) & (rows < bottom[..., None])  # (n, holes, H)
        in_cols = (cols >= left[..., None]) & (cols < right[..., None])  # (n, holes, W)
        inside = (in_rows[..., :, None] & in_cols[..., None, :]).any(1, keepdim=True)
        return images.masked_fill(inside, 0.0)


class DeviceBatches:
    """An iterable of (normalised images, labels) train batches that live on ``device``.

    Stands in for the train DataLoader in ``engine.fit``: ``len()`` batches per
    epoch, ``sampler.set_epoch``, and ``generator`` (the augmentation's draws,
    saved in the resume state).
    """

    def __init__(self, split: Split, stats: ChannelStats, batch_size: int, *, seed: int,
                 augment: AugmentParams | None, device: torch.device,
                 weights: np.ndarray | None = None, world: World | None = None,
                 class_counts: list[float] | None = None) -> None:  # fmt: skip
        world = world or World()
        rows = np.arange(len(split))
        pixels = torch.from_numpy(take_rows(split.images, rows)).permute(0, 3, 1, 2)
        self.images = pixels.contiguous().to(device)  # uint8: a quarter of float32's memory
        self.cpu_labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
        self.labels = self.cpu_labels.to(device)
        channels = self.images.shape[1]
        self.mean = torch.tensor(stats.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(stats.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        assert self.mean.shape[1] == channels, (stats, channels)
        balanced = weights is not None and not np.allclose(weights, weights[0])
        self.sampler = ShardedSampler(len(split), seed, world, weights if balanced else None)
        self.batch_size = local_batch_size(batch_size, world)
        self.drop_last = len(self.sampler) > self.batch_size  # as make_loader: BatchNorm needs 2
        self.generator = torch.Generator().manual_seed(seed)
        minority = frozenset()
        if augment is not None and augment.minority_boost != 1.0 and class_counts is not None:
            minority = minority_classes(class_counts)
        if augment is not None:
            augment = resolve_augment(augment, int(pixels.shape[1]))
        self.augment = None if augment is None else TensorAugment(augment, self.generator, minority)

    def __len__(self) -> int:
        batches = len(self.sampler) / self.batch_size
        return math.floor(batches) if self.drop_last else math.ceil(batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for step in range(len(self)):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            on_device = rows.to(self.images.device)
            images = self.images[on_device].float() / 255.0
            labels = self.labels[on_device]
            if self.augment is not None:  # its draws need the labels on the CPU: no sync
                images = self.augment(images, self.cpu_labels[rows])
            yield (images - self.mean) / self.std, labels
