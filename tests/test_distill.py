"""Distillation: scratch and distilled students start equal, attention transfer, kd_gain."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tasks.checkpoints import Checkpoint
from tasks.efficientnet import input_size_of, packaged_weights
from tasks.metrics import f1_macro
from tasks.models import build_model
from tasks.params import Params
from tasks.training.device_data import DeviceBatches
from tasks.training.distill import (
    FeatureTaps,
    SplitScore,
    _student,
    distillation_objective,
    fit_student,
    kd_gain,
    matched_taps,
    mix_batch,
    stage_ends,
)
from tasks.training.inputs import TrainingData, build_loaders
from tasks.training.losses import AttentionTransferLoss, KDLoss, attention_map


def _data(tiny) -> TrainingData:
    return TrainingData(tiny, tiny.train, np.ones(len(tiny.train)))


def _distill(params: Params, **update):
    fixed = {
        "model": "cnn",  # small and from scratch; the default trunk has its own test
        "pretrained": False,
        "epochs": 2,
        "width": 4,
        "batch_size": 8,
        "device": "cpu",
        "patience": 5,
        "min_steps": 0,
    }
    return params.distill.model_copy(update={**fixed, **update})


def _teacher(tiny) -> Checkpoint:
    torch.manual_seed(1)
    model = build_model("resnet", 1, tiny.num_classes, 4, 0.0)
    return Checkpoint(
        model_name="resnet", width=4, dropout=0.0, in_channels=1, image_size=8,
        classes=tiny.classes, stats=tiny.stats, params={}, metrics={},
        state_dict=model.state_dict(),
    )  # fmt: skip


def test_scratch_and_distilled_students_share_initial_weights_and_batches(
    params: Params, tiny_prepared
) -> None:
    data, distill = _data(tiny_prepared), _distill(params)
    first = _student(data, distill, seed=3, log=lambda _: None).state_dict()
    second = _student(data, distill, seed=3, log=lambda _: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    device = torch.device("cpu")

    def batches() -> list[torch.Tensor]:
        loader, _ = build_loaders(data, distill, params.augment, 3, device)
        return [images for images, _ in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(), batches(), strict=True))


def test_distilling_with_alpha_zero_is_training_from_scratch(params: Params, tiny_prepared) -> None:
    # With no weight on the soft targets the teacher changes nothing, so any
    # difference would come from diverging initial weights, batches, dropout
    # masks or augmentation draws between the two fits.
    data = _data(tiny_prepared)
    distill = _distill(params, alpha=0.0, dropout=0.3)
    scratch = fit_student.fn(data, None, distill, params.augment, seed=5)
    taught = fit_student.fn(data, _teacher(tiny_prepared), distill, params.augment, seed=5)
    a, b = scratch.model.state_dict(), taught.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.train_loss for r in scratch.history] == [r.train_loss for r in taught.history]


def test_the_trunk_student_starts_both_fits_from_the_imagenet_weights(
    params: Params, tiny_prepared
) -> None:
    data = _data(tiny_prepared)
    distill = _distill(
        params, model="efficientnet_lite0_trunk", pretrained=True, alpha=0.0, epochs=1
    )
    start = _student(data, distill, seed=3, log=lambda _: None)
    raw = torch.load(packaged_weights().path, map_location="cpu", weights_only=True)
    assert torch.equal(start.features[1][0].weight, raw["_conv_stem.weight"])
    assert input_size_of(start) == 32  # auto: twice the stored 8 px, at least 32
    scratch = fit_student.fn(data, None, distill, params.augment, seed=5)
    taught = fit_student.fn(data, _teacher(tiny_prepared), distill, params.augment, seed=5)
    a, b = scratch.model.state_dict(), taught.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.1.0.weight"], raw["_conv_stem.weight"])  # it trained


def test_distilling_on_device_batches_trains_both_students(params: Params, tiny_prepared) -> None:
    # The device path's batches have no .dataset: distill once crashed reading it.
    data = _data(tiny_prepared)
    distill = _distill(params, data_on_device=True, alpha=0.9, epochs=1)
    assert isinstance(build_loaders(data, distill, params.augment, 0, torch.device("cpu"))[0],
                      DeviceBatches)  # fmt: skip
    scratch = fit_student.fn(data, None, distill, params.augment, seed=5)
    taught = fit_student.fn(data, _teacher(tiny_prepared), distill, params.augment, seed=5)
    assert np.isfinite(taught.history[0].train_loss)
    assert not torch.equal(
        scratch.model.state_dict()["head.2.weight"], taught.model.state_dict()["head.2.weight"]
    )


def test_the_teacher_changes_the_student_when_it_has_weight(params: Params, tiny_prepared) -> None:
    data = _data(tiny_prepared)
    distill = _distill(params, alpha=0.9, epochs=1)
    scratch = fit_student.fn(data, None, distill, params.augment, seed=5)
    taught = fit_student.fn(data, _teacher(tiny_prepared), distill, params.augment, seed=5)
    assert not torch.equal(
        scratch.model.state_dict()["head.2.weight"], taught.model.state_dict()["head.2.weight"]
    )


def test_attention_transfer_runs_end_to_end_and_removes_its_hooks(
    params: Params, tiny_prepared
) -> None:
    data = _data(tiny_prepared)
    distill = _distill(params, feature_loss="attention", model="mobilenet", epochs=1)
    result = fit_student.fn(data, _teacher(tiny_prepared), distill, params.augment, seed=0)
    assert np.isfinite(result.history[0].train_loss)
    assert all(not block._forward_hooks for block in result.model.features)


@pytest.mark.parametrize(("name", "expected"), [("resnet", 3), ("cnn", 3), ("mobilenet", 3)])
def test_stage_ends_finds_one_block_per_resolution(name: str, expected: int) -> None:
    model = build_model(name, 1, 10, 4, 0.0)
    ends = stage_ends(model, (1, 16, 16))
    assert sorted(ends) == [4, 8, 16][-expected:]


def test_matched_taps_pair_student_and_teacher_maps_by_resolution() -> None:
    student, teacher = build_model("cnn", 1, 3, 4, 0.0), build_model("resnet", 1, 3, 6, 0.0)
    with matched_taps(student, teacher, (1, 16, 16)) as (s_taps, t_taps):
        x = torch.rand(2, 1, 16, 16)
        student(x), teacher(x)
        shapes = [
            (s.shape[-1], t.shape[-1]) for s, t in zip(s_taps.outputs, t_taps.outputs, strict=True)
        ]
        assert shapes == [(16, 16), (8, 8), (4, 4)]
        assert s_taps.outputs[0].shape[1] == 4 and t_taps.outputs[0].shape[1] == 6
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_feature_taps_keep_only_the_latest_output() -> None:
    layer = torch.nn.Identity()
    taps = FeatureTaps([layer])
    layer(torch.zeros(1)), layer(torch.ones(1))
    assert torch.equal(taps.outputs[0], torch.ones(1))
    taps.close()


# Golden value: computed once by hand below from the formula in the docstring.
S = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
T = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)


def test_attention_transfer_golden_value() -> None:
    # Q_S = mean_c s^2 = [1, 0, 0, 0] -> normalised [1, 0, 0, 0];
    # Q_T = [0, 4, 0, 0] -> [0, 1, 0, 0]; mean squared difference = 2 / 4 = 0.5;
    # beta / 2 * 0.5 = 250 at beta = 1000.
    assert attention_map(S).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert AttentionTransferLoss(1000.0)([S], [T]).item() == pytest.approx(250.0)
    assert AttentionTransferLoss(1000.0)([S, S], [T, S]).item() == pytest.approx(250.0)


def test_attention_transfer_is_zero_for_proportional_maps_and_resizes_the_student() -> None:
    t = torch.rand(2, 3, 8, 8)
    assert AttentionTransferLoss(1000.0)([3 * t], [t]).item() == pytest.approx(0.0, abs=1e-9)
    small = torch.rand(2, 5, 4, 4, requires_grad=True)
    loss = AttentionTransferLoss(1000.0)([small], [t])
    loss.backward()
    assert small.grad is not None and torch.isfinite(small.grad).all()


def test_attention_transfer_rejects_unpaired_maps() -> None:
    with pytest.raises(ValueError, match="pairs"):
        AttentionTransferLoss(1.0)([S], [])
    with pytest.raises(ValueError, match="beta"):
        AttentionTransferLoss(-1.0)


def _split_score(labels: np.ndarray, predicted: np.ndarray) -> SplitScore:
    return SplitScore(f1_macro(labels, predicted, 3), float(np.mean(labels == predicted)),
                      labels, predicted)  # fmt: skip


def test_kd_gain_is_distilled_minus_scratch_with_a_paired_interval() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    scratch = np.where(rng.random(600) < 0.7, labels, (labels + 1) % 3)
    # The distilled student fixes a third of the scratch student's mistakes.
    distilled = np.where((scratch != labels) & (rng.random(600) < 0.33), labels, scratch)
    gain = kd_gain(_split_score(labels, distilled), _split_score(labels, scratch), 3, 500, 0)
    assert gain["kd_gain"] == pytest.approx(
        f1_macro(labels, distilled, 3) - f1_macro(labels, scratch, 3)
    )
    assert gain["kd_gain_accuracy"] == pytest.approx(np.mean(distilled == labels) -
                                                     np.mean(scratch == labels))  # fmt: skip
    low, high = gain["kd_gain_ci"]
    assert 0 < low < gain["kd_gain"] < high  # a real gain: the interval excludes zero
    assert gain["kd_gain_mcnemar_p"] < 0.001
    same = kd_gain(_split_score(labels, scratch), _split_score(labels, scratch), 3, 500, 0)
    assert same["kd_gain"] == 0 and same["kd_gain_ci"] == [0.0, 0.0]
    assert same["kd_gain_mcnemar_p"] == 1.0


def test_kd_gain_refuses_students_scored_on_different_images() -> None:
    labels = np.arange(6) % 3
    with pytest.raises(ValueError, match="same split"):
        kd_gain(_split_score(labels, labels), _split_score(labels[::-1], labels), 3, 50, 0)


def _off(params: Params, **update: float):
    """No augmentation at all (every probability zero), or ``update``'s on top of that."""
    probabilities = {name: 0.0 for name in type(params.augment).model_fields if name.endswith("_p")}
    return params.augment.model_copy(update={**probabilities, **update})


def _counting_teacher_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every teacher built from a Checkpoint count the images it is shown."""
    rows: list[int] = []
    build = Checkpoint.build

    def counted(self: Checkpoint):
        model = build(self)
        model.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
        return model

    monkeypatch.setattr(Checkpoint, "build", counted)
    return rows


def test_without_augmentation_the_teacher_sees_each_train_image_once_and_teaches_the_same(
    params: Params, tiny_prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, distill = _data(tiny_prepared), _distill(params, alpha=0.9, epochs=3)
    teacher = _teacher(tiny_prepared)
    rows = _counting_teacher_rows(monkeypatch)
    cached = fit_student.fn(data, teacher, distill, _off(params), seed=5, log=lambda _: None)
    assert sum(rows) == len(data.train)  # one pass, not one per epoch
    # An augmentation that is on but changes no pixel: the per-batch teacher path.
    identity = _off(params, brightness_contrast_p=1.0, brightness_limit=0.0, contrast_limit=0.0)
    rows.clear()
    per_batch = fit_student.fn(data, teacher, distill, identity, seed=5)
    assert sum(rows) == 3 * (len(data.train) // 8) * 8  # every batch of every epoch
    passes = [fit.notes["teacher_passes_per_image"] for fit in (cached, per_batch)]
    assert passes == [1.0, pytest.approx(sum(rows) / len(data.train), abs=1e-3)]
    a, b = cached.model.state_dict(), per_batch.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    losses = [[r.train_loss for r in fit.history] for fit in (cached, per_batch)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_mix_batch_blends_each_image_with_another_of_the_batch_from_pythons_random() -> None:
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    random.seed(0)
    mixed, order, lam = mix_batch(images, alpha=1.0)
    assert 0.0 <= lam <= 1.0 and sorted(order.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[order])
    random.seed(0)
    again, again_order, again_lam = mix_batch(images, alpha=1.0)
    assert again_lam == lam and torch.equal(again_order, order) and torch.equal(again, mixed)


def test_function_matching_shows_both_networks_the_mixed_batch_and_mixes_the_label_term() -> None:
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    images, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    loss = KDLoss(temperature=2.0, alpha=0.5)
    random.seed(7)
    total, logits = distillation_objective(teacher, loss, mixup=0.4)(student, images, labels)
    random.seed(7)
    mixed, order, lam = mix_batch(images, 0.4)
    with torch.no_grad():
        t = teacher(mixed)
    torch.testing.assert_close(logits, student(mixed))
    expected = lam * loss(student(mixed), t, labels) + (1 - lam) * loss(
        student(mixed), t, labels[order]
    )
    torch.testing.assert_close(total, expected)
    assert 0.0 < lam < 1.0  # both label sets had weight


def test_mixup_distillation_trains_from_per_batch_teacher_passes(
    params: Params, tiny_prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, distill = _data(tiny_prepared), _distill(params, alpha=0.9, epochs=2, mixup=1.0)
    rows = _counting_teacher_rows(monkeypatch)
    # No augmentation, but mixup changes the views every epoch: no cached logits.
    result = fit_student.fn(data, _teacher(tiny_prepared), distill, _off(params), seed=5)
    assert sum(rows) == 2 * (len(data.train) // 8) * 8
    assert all(np.isfinite(r.train_loss) for r in result.history)
