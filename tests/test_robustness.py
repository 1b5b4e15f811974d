"""The fixed corruptions of the robustness table: what each does, and that it repeats."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.pixels import ChannelStats
from tasks.evaluation.robustness import CORRUPTIONS, corrupt, corrupted_sets, fgsm_accuracy
from tests.toymodels import corner_data, trained_corner_model

IMAGES = np.full((6, 16, 16, 1), 128, np.uint8)
IMAGES[:, 4:12, 4:12] = 200  # a bright square on grey


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_keeps_the_format_changes_the_image_and_repeats(name: str) -> None:
    out = corrupt(IMAGES, name, seed=0)
    assert out.shape == IMAGES.shape and out.dtype == np.uint8
    assert not np.array_equal(out, IMAGES)
    assert np.array_equal(out, corrupt(IMAGES, name, seed=0))


def test_severities_do_what_their_names_say() -> None:
    occluded = corrupt(IMAGES, "occlusion_25pct", seed=0)
    hidden = (occluded == 0).mean(axis=(1, 2, 3))
    assert np.allclose(hidden, 0.25)  # an 8x8 hole in a 16x16 image
    assert corrupt(IMAGES, "brightness_+0.3", 0).mean() > IMAGES.mean() + 50
    assert corrupt(IMAGES, "brightness_-0.3", 0).mean() < IMAGES.mean() - 50
    assert corrupt(IMAGES, "contrast_-0.5", 0).std() < IMAGES.std() * 0.75
    assert (
        corrupt(IMAGES, "gamma_2.0", 0).mean()
        < IMAGES.mean()
        < corrupt(IMAGES, "gamma_0.5", 0).mean()
    )


def test_corrupted_sets_cover_every_corruption_and_unknown_names_fail() -> None:
    assert set(corrupted_sets.fn(IMAGES[:2], seed=1)) == set(CORRUPTIONS)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(IMAGES, "fog", seed=0)


def test_fgsm_hurts_more_as_epsilon_grows_and_keeps_images_valid() -> None:
    model = trained_corner_model()
    test, labels = corner_data(128, seed=2)
    # back to uint8 images, with statistics that map them onto what the model saw
    pixels = np.clip(test.numpy().transpose(0, 2, 3, 1) * 40 + 100, 0, 255).astype(np.uint8)
    stats = ChannelStats(mean=(100 / 255,), std=(40 / 255,))
    accuracy = fgsm_accuracy(model, pixels, labels.numpy(), stats, [0.001, 0.05, 0.3])
    assert list(accuracy) == ["eps_0.001", "eps_0.05", "eps_0.3"]
    assert accuracy["eps_0.001"] > 0.9  # a nudge changes nothing
    assert accuracy["eps_0.001"] >= accuracy["eps_0.05"] >= accuracy["eps_0.3"]
    assert accuracy["eps_0.3"] < 0.5  # a large step flips most decisions
