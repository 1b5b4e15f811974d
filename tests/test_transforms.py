"""Albumentations pipelines from params: every transform, p = 0 left out, seeded, serialisable."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from tasks.params import AugmentParams, Params
from tasks.training.transforms import build_augment

SWITCHES = (
    "hflip_p", "vflip_p", "crop_p", "affine_p", "elastic_p", "brightness_contrast_p", "gamma_p",
    "hue_saturation_p", "blur_p", "noise_p", "dropout_p",
)  # fmt: skip


def _image(seed: int = 0, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, channels), dtype=np.uint8)


def _with(augment: AugmentParams, p: float, **update: float) -> AugmentParams:
    return augment.model_copy(update={**dict.fromkeys(SWITCHES, p), **update})


def test_build_augment_keeps_shape_and_dtype(params: Params) -> None:
    augment = build_augment(params.augment, seed=0, channels=1, size=8)
    image = _image()
    outputs = [augment(image, 0) for _ in range(10)]
    assert all(out.shape == (8, 8, 1) and out.dtype == np.uint8 for out in outputs)
    assert any(not np.array_equal(out, image) for out in outputs)  # it does augment


@pytest.mark.parametrize("channels", [1, 3])
def test_build_augment_with_every_transform_on(params: Params, channels: int) -> None:
    augment = build_augment(_with(params.augment, 1.0), seed=0, channels=channels, size=8)
    names = [type(t).__name__ for t in augment.common.transforms]
    colour = ["HueSaturationValue"] if channels == 3 else []  # hue needs colour
    assert names == [
        "HorizontalFlip", "VerticalFlip", "RandomResizedCrop", "Affine", "ElasticTransform",
        "RandomBrightnessContrast", "RandomGamma", *colour, "GaussianBlur", "GaussNoise",
        "CoarseDropout",
    ]  # fmt: skip
    for seed in range(5):
        out = augment(_image(seed, channels=channels), 0)
        assert out.shape == (8, 8, channels)
        assert out.dtype == np.uint8


def test_build_augment_leaves_out_p_zero(params: Params) -> None:
    augment = build_augment(_with(params.augment, 0.0), seed=0)
    assert len(augment.common.transforms) == 0
    assert np.array_equal(augment(_image(), 0), _image())


@pytest.mark.parametrize(("channels", "flips"), [(3, True), (1, False)])
def test_auto_hflip_flips_colour_data_and_leaves_grayscale_unmirrored(
    params: Params, channels: int, flips: bool
) -> None:
    settings = _with(params.augment, 0.0, hflip_p="auto")
    augment = build_augment(settings, seed=0, channels=channels, size=8)
    names = [type(t).__name__ for t in augment.common.transforms]
    assert names == (["HorizontalFlip"] if flips else [])
    if flips:
        assert augment.common.transforms[0].p == 0.5
    chosen = build_augment(_with(params.augment, 0.0, hflip_p=0.2), seed=0, channels=1, size=8)
    assert [t.p for t in chosen.common.transforms] == [0.2]  # a number is kept as it is


def test_build_augment_same_seed_same_outputs(params: Params) -> None:
    image = _image()

    def draws(seed: int) -> list[np.ndarray]:
        augment = build_augment(params.augment, seed=seed, size=8)
        return [augment(image, 0) for _ in range(10)]

    first, again, other = draws(5), draws(5), draws(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_minority_classes_get_every_probability_boosted(params: Params) -> None:
    settings = _with(params.augment, 0.0, affine_p=0.2, noise_p=0.4, minority_boost=3.0)
    augment = build_augment(settings, seed=0, size=8, class_counts=[100, 60, 49, 10])
    assert augment.minority == {2, 3}  # fewer than half of the largest class
    common = {type(t).__name__: t.p for t in augment.common.transforms}
    strong = {type(t).__name__: t.p for t in augment.strong.transforms}
    assert common == {"Affine": 0.2, "GaussNoise": 0.4}
    assert strong == {"Affine": pytest.approx(0.6), "GaussNoise": 1.0}  # capped at 1
    # without a boost there is one pipeline for every class
    plain = build_augment(params.augment, seed=0, size=8, class_counts=[100, 10])
    assert plain.strong is None and plain.minority == frozenset()


def test_augment_serialises_with_albumentations_and_replays(params: Params) -> None:
    settings = _with(params.augment, 0.5, minority_boost=2.0)
    augment = build_augment(settings, seed=3, size=8, class_counts=[10, 2])
    spec = augment.to_dict()
    assert spec["minority_classes"] == [1]
    replay = A.from_dict(spec["all_classes"])
    assert [type(t).__name__ for t in replay.transforms] == [
        type(t).__name__ for t in augment.common.transforms
    ]
    replay.set_random_seed(3)
    augment.set_random_seed(3)
    image = _image()
    assert np.array_equal(replay(image=image)["image"], augment(image, 0))
