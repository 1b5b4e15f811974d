"""Transforms and the training engine on 8x8 grayscale images, on the CPU."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from torch import nn

from tasks.data.datasets import ChannelStats, PreparedData, Rows, Split, normalise, take_rows
from tasks.models import build_model
from tasks.params import AugmentParams, Params, TrainParams
from tasks.training.distributed import ShardedSampler, World, local_batch_size
from tasks.training.engine import (
    Budget,
    FitResult,
    ImageDataset,
    Objective,
    Precision,
    fit,
    make_loader,
    predict_logits,
    select_device,
    supervised_objective,
)
from tasks.training.train import TrainingData, fit_teacher
from tasks.transforms import build_augment

CPU = torch.device("cpu")
SWITCHES = (
    "hflip_p", "vflip_p", "crop_p", "affine_p", "elastic_p", "brightness_contrast_p", "gamma_p",
    "hue_saturation_p", "blur_p", "noise_p", "dropout_p",
)  # fmt: skip

# ---------------------------------------------------------------- transforms


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


def test_normalise_standardises_with_train_stats(tiny_prepared: PreparedData) -> None:
    images, stats = tiny_prepared.train.images, tiny_prepared.stats
    out = normalise(images, stats)
    assert out.dtype == np.float32
    assert out.shape == (len(images), 1, 8, 8)
    assert out.flags.c_contiguous
    assert out.mean() == pytest.approx(0.0, abs=1e-5)
    assert out.std() == pytest.approx(1.0, abs=1e-4)
    assert normalise(images[0], stats).shape == (1, 8, 8)  # one HWC image -> CHW


def test_normalise_channel_order() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 51, 102, 255
    stats = ChannelStats(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    out = normalise(image, stats)
    assert out.shape == (3, 2, 3)
    expected = [(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (1.0 - 0.3) / 0.1]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


# ---------------------------------------------------------------- fit


def _fit_params(params: Params, **update: object) -> TrainParams:
    values = {
        **params.train.model_dump(),
        "model": "cnn",
        "pretrained": False,
        "width": 4,
        "dropout": 0.0,
        "min_steps": 0,
        "epochs": 6,
        "batch_size": 8,
        "lr": 0.01,
        "weight_decay": 0.0,
        "patience": 2,
        "device": "cpu",
        "num_workers": 0,
    }
    return TrainParams(**{**values, **update})


def _bright_vs_dark(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    bright = rng.integers(180, 256, size=(n, 8, 8, 1))
    dark = rng.integers(0, 60, size=(n, 8, 8, 1))
    images = np.where(labels[:, None, None, None] == 1, bright, dark).astype(np.uint8)
    return Split(images, labels.astype(np.int64))


def _fit(
    model: nn.Module, objective: Objective, train: Split, val: Split, fit_params: TrainParams
) -> tuple[FitResult, torch.utils.data.DataLoader]:
    stats = ChannelStats.of(train.images)
    train_loader = make_loader(train, stats, fit_params.batch_size, seed=0, train=True)
    val_loader = make_loader(val, stats, 64, seed=0)
    return fit(model, objective, train_loader, val_loader, fit_params, CPU), val_loader


def _val_loss(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    logits = torch.from_numpy(predict_logits(model, loader, CPU))
    return nn.functional.cross_entropy(logits, loader.dataset.labels).item()


def test_fit_separates_bright_from_dark(params: Params) -> None:
    torch.manual_seed(0)
    fit_params = _fit_params(params)
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    result, val_loader = _fit(
        model,
        supervised_objective(nn.CrossEntropyLoss()),
        _bright_vs_dark(32, 0),
        _bright_vs_dark(16, 1),
        fit_params,
    )
    assert result.best_val_f1_macro == 1.0
    assert 1 <= len(result.history) <= fit_params.epochs
    assert [r.epoch for r in result.history] == list(range(1, len(result.history) + 1))
    best = result.history[result.best_epoch - 1]
    assert best.val_f1_macro == result.best_val_f1_macro
    # The returned model holds the best epoch's weights.
    assert _val_loss(result.model, val_loader) == pytest.approx(best.val_loss, abs=1e-5)
    predicted = predict_logits(result.model, val_loader, CPU).argmax(axis=1)
    assert np.array_equal(predicted, val_loader.dataset.labels.numpy())


def test_fit_trains_channels_last_on_the_cpu(params: Params) -> None:
    """oneDNN's NHWC kernels: 1.4x faster here than NCHW (benchmarks/train_throughput.py)."""
    seen: list[bool] = []

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        seen.append(images.is_contiguous(memory_format=torch.channels_last))
        return supervised_objective(nn.CrossEntropyLoss())(model, images, labels)

    torch.manual_seed(0)
    model = build_model("cnn", 3, 2, width=4, dropout=0.0)
    train = _bright_vs_dark(16, 0)
    rgb = Split(np.repeat(train.images, 3, axis=3), train.labels)
    result, _ = _fit(model, objective, rgb, rgb, _fit_params(params, epochs=1))
    assert seen and all(seen)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_fit_restores_best_weights_after_getting_worse(params: Params) -> None:
    """After two epochs the objective turns to gradient ascent, so later epochs get worse."""
    torch.manual_seed(0)
    steps = 0
    ascend_after = 2 * 4  # two epochs of 32 images in batches of 8

    def sabotaged(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        nonlocal steps
        steps += 1
        loss, logits = supervised_objective(nn.CrossEntropyLoss())(model, images, labels)
        return (loss if steps <= ascend_after else -loss), logits

    fit_params = _fit_params(params, epochs=8, patience=3, lr=0.05)
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    result, val_loader = _fit(
        model, sabotaged, _bright_vs_dark(32, 0), _bright_vs_dark(16, 1), fit_params
    )
    assert result.best_epoch < len(result.history)
    assert result.history[-1].val_loss > result.best_val_loss
    assert _val_loss(result.model, val_loader) == pytest.approx(result.best_val_loss, abs=1e-5)


def _frozen(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """A finite loss with zero gradient: with weight_decay 0, AdamW never moves a weight."""
    logits = model(images)
    return logits.sum() * 0.0 + 1.0, logits


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_when_val_cannot_improve(params: Params, patience: int) -> None:
    # No BatchNorm (its running stats would still move) and no gradient: every
    # epoch scores exactly the same, so nothing ever beats epoch 1. Random labels
    # would only make this likely, not certain.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    fit_params = _fit_params(params, epochs=6, patience=patience)
    result, _ = _fit(model, _frozen, _bright_vs_dark(16, 0), _bright_vs_dark(8, 1), fit_params)
    assert result.stopped_early
    assert len(result.history) == patience + 1 < fit_params.epochs
    assert result.best_epoch == 1


def test_early_stopping_waits_for_the_warm_up_and_min_steps(params: Params) -> None:
    """Nothing improves after epoch 1, yet patience may only run out once one-cycle's
    warm-up (30% of the steps) and ``min_steps`` are both behind the fit."""
    train, val = _bright_vs_dark(16, 0), _bright_vs_dark(8, 1)  # 2 steps per epoch
    for min_steps, schedule, expected in (
        (0, "cosine", 2),
        (0, "onecycle", 6),
        (16, "onecycle", 8),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        fit_params = _fit_params(
            params, epochs=20, patience=1, min_steps=min_steps, schedule=schedule
        )
        result, _ = _fit(model, _frozen, train, val, fit_params)
        # cosine: no warm-up, stop after patience; onecycle: 0.3 * 40 steps = epoch 6
        assert len(result.history) == expected, (min_steps, schedule)
        assert result.stopped_early and result.epochs_planned == 20


def test_a_small_split_gets_enough_epochs_for_min_steps(params: Params) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    fit_params = _fit_params(params, epochs=2, min_steps=10, patience=50)
    lines: list[str] = []
    stats = ChannelStats.of(_bright_vs_dark(16, 0).images)
    train = make_loader(_bright_vs_dark(16, 0), stats, 8, seed=0, train=True)
    val = make_loader(_bright_vs_dark(8, 1), stats, 64, seed=0)
    objective = supervised_objective(nn.CrossEntropyLoss())
    result = fit(model, objective, train, val, fit_params, CPU, log=lines.append)
    assert result.epochs_planned == 5 == len(result.history)  # 10 steps at 2 per epoch
    assert any("5 epochs instead of 2" in line for line in lines)
    # One-cycle spans all 10 steps: its lr peaks at the end of the warm-up (step 2, epoch 1)
    # and anneals over the rest (a schedule sized for 2 epochs would have raised when
    # stepped past its 4 steps).
    rates = [record.lr for record in result.history]
    assert rates[0] == pytest.approx(fit_params.lr) and rates[1] > rates[2] > rates[3]


def test_budget_counts_steps() -> None:
    class Fake:
        epochs, min_steps, schedule = 3, 100, "onecycle"

    budget = Budget.of(Fake(), steps_per_epoch=20)
    assert (budget.epochs, budget.total_steps, budget.earliest_stop_step) == (5, 100, 100)
    assert not budget.may_stop_after(4) and budget.may_stop_after(5)


def test_nan_loss_names_epoch_and_step(params: Params) -> None:
    steps = 0

    def turns_nan(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        nonlocal steps
        steps += 1
        loss, logits = supervised_objective(nn.CrossEntropyLoss())(model, images, labels)
        return (loss * float("nan") if steps == 7 else loss), logits  # epoch 2, step 3

    torch.manual_seed(0)
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    with pytest.raises(FloatingPointError, match="epoch 2, step 3"):
        _fit(model, turns_nan, _bright_vs_dark(32, 0), _bright_vs_dark(8, 1), _fit_params(params))


def test_select_device() -> None:
    assert select_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


# ---------------------------------------------------------------- loaders


def test_loader_with_workers_repeats_for_a_seed(
    params: Params, tiny_prepared: PreparedData
) -> None:
    train = Split(tiny_prepared.train.images[:16], tiny_prepared.train.labels[:16])

    def epochs(seed: int, augment: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_loader(
            train,
            tiny_prepared.stats,
            batch_size=4,
            seed=seed,
            train=True,
            augment=build_augment(params.augment, seed, size=8) if augment else None,
            num_workers=2,
        )
        return [tuple(map(torch.cat, zip(*loader, strict=True))) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first[0][0].shape == (16, 1, 8, 8)
    for (images, labels), (images_again, labels_again) in zip(first, again, strict=True):
        assert torch.equal(images, images_again)
        assert torch.equal(labels, labels_again)
    assert not torch.equal(first[0][0], first[1][0])  # a new epoch: new order, new draws
    assert not torch.equal(first[0][0], other[0][0])
    # Same seed without augmentation: same order (same labels), different pixels, so
    # the workers really did augment.
    plain = epochs(0, augment=False)
    assert torch.equal(plain[0][1], first[0][1])
    assert not torch.equal(plain[0][0], first[0][0])


def test_train_loader_drops_partial_batch_and_eval_loader_keeps_order(
    tiny_prepared: PreparedData,
) -> None:
    split, stats = tiny_prepared.train, tiny_prepared.stats  # 30 images
    train_loader = make_loader(split, stats, batch_size=8, seed=0, train=True)
    assert [len(labels) for _, labels in train_loader] == [8, 8, 8]
    eval_loader = make_loader(split, stats, batch_size=8, seed=0)
    labels = torch.cat([labels for _, labels in eval_loader])
    assert labels.tolist() == split.labels.tolist()


def test_balanced_weights_draw_every_class_equally_often(tiny_prepared: PreparedData) -> None:
    from tasks.data.resample import balanced_weights

    labels = np.repeat(np.arange(3), [60, 30, 6])
    split = Split(np.zeros((len(labels), 8, 8, 1), np.uint8), labels)
    weights = balanced_weights(labels, 3)

    def drawn(seed: int) -> torch.Tensor:
        loader = make_loader(
            split, tiny_prepared.stats, batch_size=32, seed=seed, train=True, weights=weights
        )
        epochs = []
        for epoch in range(20):
            loader.sampler.set_epoch(epoch)  # fit does this: a fresh draw per epoch
            epochs.append(torch.cat([y for _, y in loader]))
        return torch.cat(epochs)

    counts = torch.bincount(drawn(0), minlength=3).double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.03  # 20 epochs of 96 draws
    assert torch.equal(drawn(0), drawn(0))
    # equal weights: plain shuffling, every row exactly once per epoch
    loader = make_loader(split, tiny_prepared.stats, 16, seed=0, train=True, weights=np.ones(96))
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(labels.tolist())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu_too(params, tiny_prepared, precision: str) -> None:
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    fit_params = params.train.model_copy(
        update={"model": "cnn", "pretrained": False, "width": 4, "epochs": 2, "batch_size": 8,
                "device": "cpu", "precision": precision, "min_steps": 0}
    )  # fmt: skip
    result = fit_teacher.fn(data, fit_params, params.augment, seed=0)
    assert all(np.isfinite(r.train_loss) and np.isfinite(r.val_loss) for r in result.history)
    # autocast changes the arithmetic, never the stored weights
    assert all(
        v.dtype == torch.float32
        for v in result.model.state_dict().values()
        if v.is_floating_point()
    )


def test_precision_names_the_valid_choices() -> None:
    assert Precision.of("bf16", CPU).dtype == torch.bfloat16
    assert Precision.of("fp32", CPU).scaler().is_enabled() is False
    with pytest.raises(ValueError, match="valid choices: fp32, bf16, fp16"):
        Precision.of("fp8", CPU)


@pytest.mark.parametrize("weighted", [False, True])
def test_shards_of_two_ranks_make_up_the_single_process_batches(weighted: bool) -> None:
    weights = np.linspace(1.0, 3.0, 20) if weighted else None
    single = list(ShardedSampler(20, seed=4, weights=weights))
    shards = [list(ShardedSampler(20, 4, World(rank, 2), weights)) for rank in (0, 1)]
    # rank r's k-th batch of 3 is its share of the single process's k-th batch of 6
    for k in range(3):
        together = sorted(shards[0][3 * k : 3 * k + 3] + shards[1][3 * k : 3 * k + 3])
        assert together == sorted(single[6 * k : 6 * k + 6])
    sampler = ShardedSampler(20, seed=4)
    sampler.set_epoch(1)
    assert list(sampler) != single and sorted(sampler) == list(range(20))


def test_global_batch_must_split_evenly_over_the_ranks() -> None:
    assert local_batch_size(64, World(0, 4)) == 16
    with pytest.raises(ValueError, match="multiple of --nproc_per_node"):
        local_batch_size(64, World(0, 3))


def test_batched_dataset_reads_what_one_image_at_a_time_reads(params: Params) -> None:
    """__getitems__ (what the DataLoader calls) = stacked __getitem__, augmentation included."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(20, 8, 8, 1), dtype=np.uint8)
    split = Split(images, np.arange(20) % 4)
    stats = ChannelStats.of(images)
    rows = [7, 3, 3, 19, 0]
    one, batched = (
        ImageDataset(split, stats, build_augment(params.augment, seed=5, channels=1, size=8))
        for _ in range(2)
    )
    singles = [one[i] for i in rows]
    images_batch, labels_batch = batched.__getitems__(rows)
    torch.testing.assert_close(images_batch, torch.stack([image for image, _ in singles]))
    assert labels_batch.tolist() == [int(label) for _, label in singles] == [3, 3, 3, 3, 0]


def test_rows_take_matches_row_by_row_reads() -> None:
    base = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
    extra = np.full((2, 2, 2, 1), 200, dtype=np.uint8)
    view = Rows(base, np.array([4, 0, 4]), extra)
    rows = np.array([4, 0, 2, -1, 3])
    np.testing.assert_array_equal(view.take(rows), np.stack([view[i] for i in rows]))
    np.testing.assert_array_equal(take_rows(base, [1, 1]), base[[1, 1]])
    with pytest.raises(IndexError):
        view.take(np.array([5]))
