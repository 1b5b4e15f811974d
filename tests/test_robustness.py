"""The fixed corruptions of the robustness table: what each does, and that it repeats."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.robustness import CORRUPTIONS, corrupt, corrupted_sets

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
    assert set(corrupted_sets(IMAGES[:2], seed=1)) == set(CORRUPTIONS)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(IMAGES, "fog", seed=0)
