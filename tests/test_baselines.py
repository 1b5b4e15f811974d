"""Trivial baselines on the prepared splits, and the guard that refuses what does not beat them."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.baselines import (
    Selection,
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


# 10 balanced classes, 100 val images: a label-blind guess expects at most 0.10.
VAL_LABELS = np.repeat(np.arange(10), 10)


def _kept(f1_macro: float, accuracy: float, looks: int = 10, labels=VAL_LABELS) -> Selection:
    return Selection.of(f1_macro, accuracy, labels, looks)


def test_a_model_that_does_not_beat_the_baseline_fails_with_what_to_try(tmp_path):
    baselines = {
        "majority": {"val": {"f1_macro": 0.02}}, "linear": {"val": {"f1_macro": 0.30}},
        "best": "linear", "num_classes": 10,
    }  # fmt: skip
    write_baselines(tmp_path, baselines)
    assert read_baselines(tmp_path) == baselines
    with pytest.raises(WeakModelError) as info:
        check_fit("train", _kept(0.31, 0.35), baselines, 0.1, 0.01, allow_weak=False)
    message = str(info.value)
    expected = ("0.3100", "linear baseline (0.3000", "10 classes", ">= 0.3700",
                "train.pretrained: true", "data.image_size", "train.allow_weak: true")  # fmt: skip
    for part in expected:
        assert part in message, part
    assert "binomial" not in message  # 35 of 100 against 0.10 is significant: one reason only
    passed = check_fit("distill", _kept(0.38, 0.40), baselines, 0.1, 0.01, allow_weak=False)
    assert not passed.weak and passed.metrics()["required_val_f1_macro"] == pytest.approx(0.37)
    assert passed.metrics()["guard_p_value"] < 1e-10


def test_allow_weak_turns_the_failure_into_a_recorded_warning():
    baselines = {
        "majority": {"val": {"f1_macro": 0.5}}, "linear": {"val": {"f1_macro": 0.4}},
        "best": "majority", "num_classes": 2,
    }  # fmt: skip
    warnings: list[str] = []
    kept = _kept(0.5, 0.6, labels=np.repeat([0, 1], 50))
    check = check_fit("distill", kept, baselines, 0.2, 0.01, allow_weak=True, warn=warnings.append)
    assert check.weak and check.metrics()["weak"] is True
    assert check.metrics()["baseline"] == "majority"
    assert len(warnings) == 1 and warnings[0].startswith("WEAK MODEL")
    assert "distill.allow_weak" in warnings[0]


def test_the_p_value_is_the_binomial_tail_times_the_looks():
    # 3 of 10 right where a label-blind guess expects at most 0.2 (two classes of 2,
    # six of 1): P(X >= 3 | 10, 0.2) = 1 - P(X <= 2) = 0.3222004736 (summed by hand).
    labels = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 7])
    one = Selection.of(0.25, 0.3, labels, looks=1)
    assert (one.val_size, one.correct, one.label_blind_accuracy) == (10, 3, 0.2)
    assert one.p_value() == pytest.approx(0.3222004736, rel=1e-9)
    assert Selection.of(0.25, 0.3, labels, looks=2).p_value() == pytest.approx(0.6444009472)
    assert Selection.of(0.25, 0.3, labels, looks=4).p_value() == 1.0  # capped
    assert Selection.of(1.0, 1.0, labels, looks=1).p_value() == pytest.approx(0.2**10)


def test_a_lucky_best_of_many_looks_at_a_small_val_split_is_refused_naming_the_test():
    """The case that slipped through the margin alone: six classes of noise, 36 val
    images, the best of 150 epochs at val macro-F1 0.27 against a linear baseline of 0.107."""
    baselines = {
        "majority": {"val": {"f1_macro": 0.048}}, "linear": {"val": {"f1_macro": 0.107}},
        "best": "linear", "num_classes": 6,
    }  # fmt: skip
    labels = np.repeat(np.arange(6), 6)
    lucky = Selection.of(0.27, 13 / 36, labels, looks=150)
    with pytest.raises(WeakModelError) as info:
        check_fit("train", lucky, baselines, 0.1, 0.01, allow_weak=False)
    message = str(info.value)
    assert "does not beat the linear baseline" not in message  # it clears the margin
    expected = (
        "0.3611 (13 of 36 val images)", "0.1667", "binomial", "150 checkpoints",
        "train.significance 0.01", "carry no information", "train.allow_weak: true",
    )  # fmt: skip
    for part in expected:
        assert part in message, part
    # The same score from one look would pass: it is the looks that make it luck.
    assert not check_fit("train", Selection.of(0.27, 13 / 36, labels, 1), baselines, 0.1,
                         0.01, allow_weak=False).weak  # fmt: skip


def test_missing_baselines_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        read_baselines(tmp_path)
