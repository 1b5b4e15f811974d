"""Trivial baselines on the prepared splits, and the guard that refuses what does not beat them."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.baselines import (
    WeakModelError,
    check_fit,
    downsample,
    read_baselines,
    trivial_baselines,
    write_baselines,
)
from tasks.data.datasets import PreparedData, Split
from tasks.data.pixels import ChannelStats


def _prepared(rng: np.random.Generator, learnable: bool, per_class=(40, 20, 10)) -> PreparedData:
    def split(counts) -> Split:
        labels = np.repeat(np.arange(3), counts)
        images = rng.integers(0, 256, size=(len(labels), 16, 16, 1)).astype(np.float64)
        if learnable:  # class c is bright in its own third of the image
            for c in range(3):
                images[labels == c, :, c * 5 : c * 5 + 5] += 120
        return Split(np.clip(images, 0, 255).astype(np.uint8), labels)

    train = split(per_class)
    return PreparedData(
        train,
        split((10, 10, 10)),
        split((10, 10, 10)),
        ("a", "b", "c"),
        ChannelStats.of(train.images),
    )


def test_downsample_averages_blocks_of_pixels():
    images = np.arange(2 * 16 * 16 * 3, dtype=np.uint8).reshape(2, 16, 16, 3)
    out = downsample(images, side=8)
    assert out.shape == (2, 8 * 8 * 3)
    block = images[0, :2, :2, 0].astype(np.float32).mean() / 255
    assert out[0, 0] == pytest.approx(block)
    # an image smaller than the side keeps its own size
    assert downsample(images[:, :4, :4], side=8).shape == (2, 4 * 4 * 3)


def test_linear_beats_majority_on_learnable_data_and_not_on_noise():
    rng = np.random.default_rng(0)
    learnable = trivial_baselines(_prepared(rng, learnable=True), seed=0)
    assert learnable["best"] == "linear"
    assert learnable["linear"]["val"]["f1_macro"] > 0.9
    # the majority class is a: a third of balanced val, and macro-F1 (1/2 for a, 0 else) / 3
    assert learnable["majority"]["val"]["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert learnable["majority"]["val"]["f1_macro"] == pytest.approx(1 / 6, abs=1e-6)
    noise = trivial_baselines(_prepared(rng, learnable=False), seed=0)
    assert noise["linear"]["val"]["f1_macro"] < 0.6
    assert noise["num_classes"] == 3 and noise["linear"]["pixels"] == "8x8"


def test_a_model_that_does_not_beat_the_baseline_fails_with_what_to_try(tmp_path):
    baselines = {
        "majority": {"val": {"f1_macro": 0.02}}, "linear": {"val": {"f1_macro": 0.30}},
        "best": "linear", "num_classes": 10,
    }  # fmt: skip
    write_baselines(tmp_path, baselines)
    assert read_baselines(tmp_path) == baselines
    with pytest.raises(WeakModelError) as info:
        check_fit("train", 0.31, baselines, margin=0.1, allow_weak=False)
    message = str(info.value)
    expected = ("0.3100", "linear baseline (0.3000", "10 classes", ">= 0.3700",
                "train.pretrained: true", "data.image_size", "train.allow_weak: true")  # fmt: skip
    for part in expected:
        assert part in message, part
    passed = check_fit("distill", 0.38, baselines, margin=0.1, allow_weak=False)
    assert not passed.weak and passed.metrics()["required_val_f1_macro"] == pytest.approx(0.37)


def test_allow_weak_turns_the_failure_into_a_recorded_warning():
    baselines = {
        "majority": {"val": {"f1_macro": 0.5}}, "linear": {"val": {"f1_macro": 0.4}},
        "best": "majority", "num_classes": 2,
    }  # fmt: skip
    warnings: list[str] = []
    check = check_fit("distill", 0.5, baselines, 0.2, allow_weak=True, warn=warnings.append)
    assert check.weak and check.metrics()["weak"] is True
    assert check.metrics()["baseline"] == "majority"
    assert len(warnings) == 1 and warnings[0].startswith("WEAK MODEL")
    assert "distill.allow_weak" in warnings[0]


def test_missing_baselines_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        read_baselines(tmp_path)
