"""The train-time augmentation: albumentations pipelines built from the ``augment`` params.

``build_augment`` turns ``augment`` into a seeded pipeline, and a stronger one
for minority classes when ``augment.minority_boost`` > 1; ``Augment`` applies
them, and its generators' state is saved with a fit so a resumed run draws
what it would have drawn. Used by the train and distill stages' batches
(``tasks/training/``); the normalisation every model shares is
``tasks/data/pixels.normalise``.
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from tasks.params import AugmentParams


def _pipeline(params: AugmentParams, seed: int, channels: int, size: int, boost: float):
    """The albumentations steps ``augment:`` describes, each probability times ``boost``."""

    def p(value: float) -> float:
        return min(1.0, value * boost)

    steps: list[A.BasicTransform] = []
    if params.hflip_p > 0:
        steps.append(A.HorizontalFlip(p=p(params.hflip_p)))
    if params.vflip_p > 0:
        steps.append(A.VerticalFlip(p=p(params.vflip_p)))
    if params.crop_p > 0:
        steps.append(
            A.RandomResizedCrop(
                size=(size, size), scale=(params.crop_scale_min, 1.0), p=p(params.crop_p)
            )
        )
    if params.affine_p > 0:
        steps.append(
            A.Affine(
                rotate=(-params.rotate_deg, params.rotate_deg),
                translate_percent=(-params.translate_frac, params.translate_frac),
                scale=(params.scale_min, params.scale_max),
                shear=(-params.shear_deg, params.shear_deg),
                border_mode=0,
                fill=0,
                p=p(params.affine_p),
            )
        )
    if params.elastic_p > 0:
        steps.append(
            A.ElasticTransform(
                alpha=params.elastic_alpha, sigma=params.elastic_sigma, p=p(params.elastic_p)
            )
        )
    if params.brightness_contrast_p > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=params.brightness_limit,
                contrast_limit=params.contrast_limit,
                p=p(params.brightness_contrast_p),
            )
        )
    if params.gamma_p > 0:  # albumentations writes gamma in percent
        limit = (100.0 * params.gamma_min, 100.0 * params.gamma_max)
        steps.append(A.RandomGamma(gamma_limit=limit, p=p(params.gamma_p)))
    if params.hue_saturation_p > 0 and channels == 3:
        steps.append(
            A.HueSaturationValue(
                hue_shift_limit=params.hue_shift,
                sat_shift_limit=params.saturation_shift,
                val_shift_limit=0,
                p=p(params.hue_saturation_p),
            )
        )
    if params.blur_p > 0:
        steps.append(A.GaussianBlur(sigma_limit=(0.1, params.blur_sigma_max), p=p(params.blur_p)))
    if params.noise_p > 0:
        steps.append(A.GaussNoise(std_range=(0.0, params.noise_std), p=p(params.noise_p)))
    if params.dropout_p > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, params.dropout_holes),
                hole_height_range=(0.05, params.dropout_size_frac),
                hole_width_range=(0.05, params.dropout_size_frac),
                fill=0,
                p=p(params.dropout_p),
            )
        )
    return A.Compose(steps, seed=seed)


def minority_classes(counts: list[float]) -> frozenset[int]:
    """Classes with fewer than half the images of the largest one."""
    largest = max(counts)
    return frozenset(c for c, n in enumerate(counts) if n < largest / 2)


class Augment:
    """Train-time augmentation of uint8 HWC images, stronger for minority classes.

    Every class gets the pipeline ``augment:`` describes; when
    ``augment.minority_boost`` > 1, the classes in ``minority`` get the same
    pipeline with every probability multiplied by it (capped at 1), so rare
    classes are varied more often. Both pipelines are seeded; DataLoader
    workers re-seed them through ``set_random_seed`` (``tasks/training/loaders.py``).
    """

    def __init__(self, common: A.Compose, strong: A.Compose | None, minority: frozenset[int]):
        self.common = common
        self.strong = strong
        self.minority = minority if strong is not None else frozenset()

    @property
    def is_identity(self) -> bool:
        """True when every probability is zero: the pipelines hold no transform at all."""
        return all(not p.transforms for p in (self.common, self.strong) if p is not None)

    def __call__(self, image: np.ndarray, label: int) -> np.ndarray:
        pipeline = self.strong if label in self.minority else self.common
        out = pipeline(image=image)["image"]
        return out[..., None] if out.ndim == 2 else out  # some ops drop a singleton channel

    def set_random_seed(self, seed: int) -> None:
        self.common.set_random_seed(seed)
        if self.strong is not None:
            self.strong.set_random_seed(seed + 1)

    def _generators(self) -> list:
        """Every object in both pipelines that draws random numbers, in a fixed order."""
        found = []

        def walk(transform) -> None:
            found.append(transform)
            for child in getattr(transform, "transforms", []):
                walk(child)

        for pipeline in (self.common, self.strong):
            if pipeline is not None:
                walk(pipeline)
        return found

    def get_state(self) -> list[dict]:
        """The state of every generator (to resume training exactly where it stopped)."""
        return [
            {"numpy": t.random_generator.bit_generator.state, "python": t.py_random.getstate()}
            for t in self._generators()
        ]

    def set_state(self, state: list[dict]) -> None:
        generators = self._generators()
        if len(state) != len(generators):
            raise ValueError("augmentation state does not match this pipeline")
        for transform, saved in zip(generators, state, strict=True):
            transform.random_generator.bit_generator.state = saved["numpy"]
            transform.py_random.setstate(_as_tuples(saved["python"]))

    def to_dict(self) -> dict:
        """The exact pipelines in albumentations' own serialisation (``A.from_dict`` reads them)."""
        return {
            "all_classes": A.to_dict(self.common),
            "minority_classes": sorted(self.minority),
            "minority_pipeline": None if self.strong is None else A.to_dict(self.strong),
        }


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


AUTO_HFLIP_RGB = 0.5


def resolve_augment(params: AugmentParams, channels: int) -> AugmentParams:
    """``params`` with ``hflip_p: auto`` decided by the data's channels.

    RGB data (photos, objects, scenes) is mirror-invariant, and a flip is the
    augmentation that helps most there: 0.5. Grayscale data is often glyphs
    (digits, letters, symbols), which a mirror turns into other glyphs: 0.
    """
    if params.hflip_p != "auto":
        return params
    return params.model_copy(update={"hflip_p": AUTO_HFLIP_RGB if channels == 3 else 0.0})


def build_augment(
    params: AugmentParams,
    seed: int,
    channels: int = 1,
    size: int = 16,
    class_counts: list[float] | None = None,
) -> Augment:
    """The train-time augmentation; a transform with p=0 is left out.

    Works on uint8 HWC arrays and returns the same, so augmentation happens
    before normalisation, on the pixel scale the parameters are written in.
    ``class_counts`` (what the model sees per epoch) decides the minority classes.
    """
    params = resolve_augment(params, channels)
    common = _pipeline(params, seed, channels, size, 1.0)
    if params.minority_boost == 1.0 or class_counts is None:
        return Augment(common, None, frozenset())
    strong = _pipeline(params, seed + 1, channels, size, params.minority_boost)
    return Augment(common, strong, minority_classes(class_counts))
