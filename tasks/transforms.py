"""Image transforms: the albumentations train-time augmentation and the normalisation
that training, calibration and inference share (so preprocessing matches at deployment).
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from tasks.datasets import ChannelStats
from tasks.params import AugmentParams


def build_augment(params: AugmentParams, seed: int) -> A.Compose:
    """The train-time pipeline ``augment:`` describes; a transform with p=0 is left out.

    Works on uint8 HWC arrays and returns the same, so augmentation happens
    before normalisation, on the pixel scale the parameters are written in.
    """
    steps: list[A.BasicTransform] = []
    if params.hflip_p > 0:
        steps.append(A.HorizontalFlip(p=params.hflip_p))
    if params.affine_p > 0:
        steps.append(
            A.Affine(
                rotate=(-params.rotate_deg, params.rotate_deg),
                translate_percent=(-params.translate_frac, params.translate_frac),
                scale=(params.scale_min, params.scale_max),
                border_mode=0,
                fill=0,
                p=params.affine_p,
            )
        )
    if params.brightness_contrast_p > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=params.brightness_limit,
                contrast_limit=params.contrast_limit,
                p=params.brightness_contrast_p,
            )
        )
    if params.noise_p > 0:
        steps.append(A.GaussNoise(std_range=(0.0, params.noise_std), p=params.noise_p))
    if params.dropout_p > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, params.dropout_holes),
                hole_height_range=(0.05, params.dropout_size_frac),
                hole_width_range=(0.05, params.dropout_size_frac),
                fill=0,
                p=params.dropout_p,
            )
        )
    return A.Compose(steps, seed=seed)


def normalise(images: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 channels-first, standardised with train stats."""
    mean = np.asarray(stats.mean, dtype=np.float32)
    std = np.asarray(stats.std, dtype=np.float32)
    scaled = (np.asarray(images, dtype=np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))
