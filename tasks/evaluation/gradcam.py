"""Grad-CAM: where in the image a class decision came from.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017. For the last convolutional feature
maps ``A_k`` and the class score ``y_c``:

    w_k = mean over positions of d y_c / d A_k        (how much map k matters)
    cam = ReLU(sum_k w_k A_k), upsampled to the input and scaled to [0, 1]

The networks here end in ``features -> pool -> head`` (``tasks/models.py``),
so the last feature maps are ``model.features``' output. Only fp32 PyTorch
models have gradients: the int8 ONNX model is explained by its fp32 student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from tasks.artifacts import atomic_path


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for ``classes[i]`` on normalised NCHW ``images``."""
    model.eval()
    with torch.enable_grad():
        features = model.features(images).detach().requires_grad_(True)
        logits = model.head(model.pool(features))
        score = logits.gather(1, classes[:, None]).sum()
        (grads,) = torch.autograd.grad(score, features)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / top).detach().numpy()


def pick_examples(
    labels: np.ndarray, predicted: np.ndarray, per_kind: int, seed: int
) -> dict[str, np.ndarray]:
    """A fixed sample of correctly and wrongly classified test images (indices)."""
    rng = np.random.default_rng(seed)
    picked = {}
    for kind, mask in (("correct", predicted == labels), ("misclassified", predicted != labels)):
        candidates = np.flatnonzero(mask)
        size = min(per_kind, len(candidates))
        picked[kind] = np.sort(rng.choice(candidates, size=size, replace=False))
    return picked


def plot_grad_cam(
    images: np.ndarray,
    cams: np.ndarray,
    titles: list[str],
    title: str,
    path: Path,
    columns: int = 4,
) -> Path:
    """Each image with its map laid over it in a grid; ``titles`` say actual -> predicted."""
    n = max(len(images), 1)
    rows = -(-n // columns)
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, cam, text in zip(axes.flat, images, cams, titles, strict=False):
        picture = image.squeeze()
        axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        axis.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        axis.set_title(text, fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    return path
