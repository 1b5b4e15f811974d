"""Fixed corruptions of the test split: how accuracy holds up under occlusion, light and noise.

Each corruption is one albumentations transform at a fixed severity (ranges
collapsed to a single value, probability 1), applied with a fixed seed, so
every variant is scored on exactly the same corrupted images and a run is
comparable with the next. Occlusion and illumination are what CNNs are known
to be brittle to; noise, blur and small rotations complete the picture.
``fgsm_accuracy`` adds the worst case the model's own gradients find
(``evaluate.adversarial``).
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import numpy as np
import torch

from tasks.data.pixels import ChannelStats, normalise
from tasks.orchestration import stage_task

# name -> transform; severities are part of the name so a table says what was done.
CORRUPTIONS: dict[str, Callable[[], A.BasicTransform]] = {
    "occlusion_25pct": lambda: A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(0.5, 0.5), hole_width_range=(0.5, 0.5),
        fill=0, p=1.0,
    ),  # one square hole covering a quarter of the image
    "brightness_+0.3": lambda: A.RandomBrightnessContrast(
        brightness_limit=(0.3, 0.3), contrast_limit=(0.0, 0.0), p=1.0
    ),
    "brightness_-0.3": lambda: A.RandomBrightnessContrast(
        brightness_limit=(-0.3, -0.3), contrast_limit=(0.0, 0.0), p=1.0
    ),
    "contrast_-0.5": lambda: A.RandomBrightnessContrast(
        brightness_limit=(0.0, 0.0), contrast_limit=(-0.5, -0.5), p=1.0
    ),
    "gamma_0.5": lambda: A.RandomGamma(gamma_limit=(50, 50), p=1.0),
    "gamma_2.0": lambda: A.RandomGamma(gamma_limit=(200, 200), p=1.0),
    "gaussian_noise_0.1": lambda: A.GaussNoise(std_range=(0.1, 0.1), p=1.0),
    "gaussian_blur_1.0": lambda: A.GaussianBlur(blur_limit=0, sigma_limit=(1.0, 1.0), p=1.0),
    "rotation_10deg": lambda: A.Affine(rotate=(10, 10), border_mode=0, fill=0, p=1.0),
}  # fmt: skip


def corrupt(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """``images`` (uint8 NHWC) under corruption ``name``, reproducibly for ``seed``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    pipeline = A.Compose([CORRUPTIONS[name]()], seed=seed)
    out = np.empty_like(np.asarray(images))
    for i, image in enumerate(np.asarray(images)):
        result = pipeline(image=image)["image"]
        out[i] = result[..., None] if result.ndim == 2 else result
    return out


@stage_task(name="corrupt-test")
def corrupted_sets(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Every corruption of the test images, made once and shared by all variants."""
    return {name: corrupt(images, name, seed) for name in CORRUPTIONS}


def fgsm_accuracy(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    stats: ChannelStats,
    epsilons: list[float],
    batch_size: int = 256,
) -> dict[str, float]:
    r"""Accuracy under the fast gradient sign method (Goodfellow, Shlens & Szegedy,
    "Explaining and Harnessing Adversarial Examples", ICLR 2015):
    :math:`x' = \mathrm{clip}(x + \epsilon\,\mathrm{sign}(\nabla_x L(f(x), y)))`.

    ``epsilon`` is on the [0, 1] pixel scale (0.03 is about 8 grey levels), and
    the perturbed image stays a valid image. White-box, so fp32 models only.
    """
    model.eval()
    mean = torch.tensor(stats.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(stats.std, dtype=torch.float32)[None, :, None, None]
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    correct = dict.fromkeys(epsilons, 0)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[start : start + batch_size], stats))
        y = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long)
        with torch.enable_grad():
            x.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            for eps in epsilons:
                adversarial = torch.maximum(torch.minimum(x + eps / std * grad.sign(), high), low)
                correct[eps] += int((model(adversarial).argmax(1) == y).sum())
    return {f"eps_{eps:g}": correct[eps] / len(images) for eps in epsilons}
