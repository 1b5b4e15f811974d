"""The device data path: the DataLoader's batches, albumentations' geometry, resumable draws."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats
from tasks.models import build_model
from tasks.params import Params, ParamsError, parse_params
from tasks.training.device_data import DeviceBatches, affine_theta, warp
from tasks.training.engine import fit, supervised_objective
from tasks.training.loaders import make_loader

CPU = torch.device("cpu")


def _split(n: int = 60, size: int = 8, classes: int = 3, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, size, size, 1), dtype=np.uint8)
    images[labels == 1, : size // 2, : size // 2] = 250  # learnable: bright top-left,
    images[labels == 2, size // 2 :, size // 2 :] = 250  # bright bottom-right, or neither
    return Split(images, labels)


def test_batches_are_the_train_loaders_batches_without_augmentation() -> None:
    split = _split()
    stats = ChannelStats.of(split.images)
    loader = make_loader(split, stats, 16, seed=3, train=True)
    device = DeviceBatches(split, stats, 16, seed=3, augment=None, device=CPU)
    assert len(device) == len(loader) == 3  # 60 // 16, last partial batch dropped
    for (x, y), (dx, dy) in zip(loader, device, strict=True):
        torch.testing.assert_close(dx, x)
        assert torch.equal(dy, y)


def test_balanced_weights_draw_the_same_rows_as_the_loader() -> None:
    split = _split()
    weights = np.where(split.labels == 0, 5.0, 1.0)
    stats = ChannelStats.of(split.images)
    loader = make_loader(split, stats, 20, seed=1, train=True, weights=weights)
    device = DeviceBatches(split, stats, 20, seed=1, augment=None, device=CPU, weights=weights)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in device]


@pytest.mark.parametrize(
    ("angle", "scale", "shear"),
    [(30.0, 1.0, (0.0, 0.0)), (90.0, 1.0, (0.0, 0.0)), (0.0, 1.2, (0.0, 0.0)),
     (0.0, 1.0, (20.0, 0.0)), (0.0, 1.0, (0.0, 20.0)), (25.0, 0.9, (10.0, -15.0))],
)  # fmt: skip
def test_affine_moves_pixels_where_albumentations_affine_does(angle, scale, shear) -> None:
    image = np.zeros((16, 16, 1), np.uint8)
    image[2:5, 10:14] = 255  # a blob up and to the right of the centre
    expected = A.Affine(rotate=(angle, angle), scale=(scale, scale),
                        shear={"x": (shear[0], shear[0]), "y": (shear[1], shear[1])},
                        border_mode=0, fill=0, p=1)(image=image)["image"]  # fmt: skip
    theta = affine_theta(torch.tensor([angle]), torch.tensor([shear]), torch.tensor([scale]),
                         torch.zeros(1, 2))  # fmt: skip
    ours = warp(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, theta)[0, 0]

    def centre_of_mass(pixels: np.ndarray) -> np.ndarray:
        rows, cols = np.indices(pixels.shape)
        return np.array([(pixels * rows).sum(), (pixels * cols).sum()]) / pixels.sum()

    np.testing.assert_allclose(
        centre_of_mass(ours.numpy()), centre_of_mass(expected[..., 0] / 255.0), atol=0.05
    )


def _augmented(params: Params, seed: int, split: Split | None = None) -> DeviceBatches:
    every = params.augment.model_copy(update={
        "hflip_p": 0.5, "affine_p": 0.7, "brightness_contrast_p": 0.5, "gamma_p": 0.5,
        "noise_p": 0.5, "dropout_p": 0.5, "dropout_holes": 2, "shear_deg": 5,
    })  # fmt: skip
    split = split or _split()
    return DeviceBatches(split, ChannelStats.of(split.images), 16, seed=seed, augment=every,
                         device=CPU)  # fmt: skip


def test_augmentation_repeats_for_a_seed_and_resumes_from_its_generator(params: Params) -> None:
    first, second = _augmented(params, seed=4), _augmented(params, seed=4)
    a, b = list(first), list(second)
    for (x, y), (u, v) in zip(a, b, strict=True):
        torch.testing.assert_close(x, u)
        assert torch.equal(y, v)
    plain = DeviceBatches(_split(), ChannelStats.of(_split().images), 16, seed=4, augment=None,
                          device=CPU)  # fmt: skip
    assert not torch.allclose(a[0][0], next(iter(plain))[0])  # it did augment

    resumed = _augmented(params, seed=4)
    state = first.generator.get_state()  # after one epoch, as the resume file keeps it
    resumed.generator.set_state(state)
    torch.testing.assert_close(next(iter(resumed))[0], next(iter(first))[0])


def test_fit_learns_from_augmented_device_batches(params: Params) -> None:
    split, val = _split(90), _split(30, seed=1)
    torch.manual_seed(0)
    update = {
        "epochs": 8,
        "lr": 0.01,
        "patience": 8,
        "device": "cpu",
        "data_on_device": True,
        "min_steps": 0,
    }
    result = fit(
        build_model("cnn", 1, 3, 8, 0.0),
        supervised_objective(torch.nn.CrossEntropyLoss()),
        _augmented(params, seed=0, split=split),
        make_loader(val, ChannelStats.of(split.images), 30, seed=0),
        params.train.model_copy(update=update),
        CPU,
        log=lambda line: None,
    )
    assert result.best_val_f1_macro > 0.9, result.best_val_f1_macro


def test_params_refuse_augmentations_the_device_path_lacks(params: Params) -> None:
    raw = params.model_dump(mode="json")
    raw["distill"]["data_on_device"] = True
    raw["augment"]["blur_p"] = 0.2
    with pytest.raises(ParamsError, match=r"distill.data_on_device.*augment\.blur_p"):
        parse_params(raw)
