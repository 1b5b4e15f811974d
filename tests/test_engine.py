"""The training loop on 8x8 grayscale images, on the CPU: it learns, restores its best
weights (or keeps the schedule's end), stops early only when it may, and names the step
of a NaN loss."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from flows.fitting import kept_checkpoint
from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats
from tasks.models import build_model
from tasks.params import Params, TrainParams
from tasks.training.engine import (
    Budget,
    FitResult,
    Objective,
    fit,
    predict_logits,
    supervised_objective,
    weight_ema,
)
from tasks.training.loaders import make_loader

CPU = torch.device("cpu")

# ---------------------------------------------------------------- transforms


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


def test_the_weight_ema_halves_a_steps_weight_after_the_half_life() -> None:
    assert weight_ema(nn.Linear(1, 1), 0.0, 5) is None  # 0: off
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = weight_ema(model, half_life_epochs=2.0, steps_per_epoch=5)
    ema.update_parameters(model)  # the first update copies
    nn.init.ones_(model.weight)
    for _ in range(10):  # two epochs of five steps
        ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.5, abs=1e-6)


def test_the_ema_changes_what_is_judged_and_kept_not_how_the_weights_train(params) -> None:
    """Same seed, EMA on and off: identical train losses (the raw weights train alike),
    different val scores (the average is validated), and the model returned is the
    average whose val loss the kept epoch recorded."""
    runs = {}
    for half_life in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model("cnn", 1, 2, width=4, dropout=0.0)
        runs[half_life] = _fit(
            model, supervised_objective(nn.CrossEntropyLoss()), _bright_vs_dark(32, 0),
            _bright_vs_dark(16, 1), _fit_params(params, ema_half_life=half_life, patience=6),
        )  # fmt: skip
    (raw, _), (averaged, val_loader) = runs[0.0], runs[1.0]
    common = min(len(raw.history), len(averaged.history))
    assert [r.train_loss for r in raw.history[:common]] == [
        r.train_loss for r in averaged.history[:common]
    ]
    assert [r.val_loss for r in raw.history[:common]] != [
        r.val_loss for r in averaged.history[:common]
    ]
    kept = averaged.history[averaged.best_epoch - 1]
    assert _val_loss(averaged.model, val_loader) == pytest.approx(kept.val_loss, abs=1e-5)


def _ascends_after(steps_before: int) -> Objective:
    """Cross-entropy for ``steps_before`` steps, then gradient ascent: later epochs get worse."""
    steps = 0

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        nonlocal steps
        steps += 1
        loss, logits = supervised_objective(nn.CrossEntropyLoss())(model, images, labels)
        return (loss if steps <= steps_before else -loss), logits

    return objective


def test_fit_restores_best_weights_after_getting_worse(params: Params) -> None:
    """After two epochs (of 32 images in batches of 8) the objective turns to ascent."""
    torch.manual_seed(0)
    fit_params = _fit_params(params, epochs=8, patience=3, lr=0.05)
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    result, val_loader = _fit(
        model, _ascends_after(2 * 4), _bright_vs_dark(32, 0), _bright_vs_dark(16, 1), fit_params
    )
    assert result.best_epoch < len(result.history)
    assert result.history[-1].val_loss > result.best_val_loss
    assert _val_loss(result.model, val_loader) == pytest.approx(result.best_val_loss, abs=1e-5)


def test_keep_last_runs_the_whole_schedule_and_returns_its_end(params: Params) -> None:
    """The same worsening fit with ``keep: last``: no early stop, the last epoch's weights
    come back although an earlier epoch scored better, and the guard counts one look."""
    torch.manual_seed(0)
    fit_params = _fit_params(params, epochs=8, patience=3, lr=0.05, keep="last")
    model = build_model("cnn", 1, 2, width=4, dropout=0.0)
    result, val_loader = _fit(
        model, _ascends_after(2 * 4), _bright_vs_dark(32, 0), _bright_vs_dark(16, 1), fit_params
    )
    last = result.history[-1]
    assert len(result.history) == 8 and not result.stopped_early
    assert result.best_epoch == 8 and result.best_val_loss == last.val_loss
    assert min(record.val_loss for record in result.history) < last.val_loss
    assert _val_loss(result.model, val_loader) == pytest.approx(last.val_loss, abs=1e-5)

    val = SimpleNamespace(prepared=SimpleNamespace(val=_bright_vs_dark(16, 1)))
    assert kept_checkpoint(result, val, "last").looks == 1
    assert kept_checkpoint(result, val, "best").looks == 8
    assert kept_checkpoint(result, val, "last").f1_macro == last.val_f1_macro


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


# ---------------------------------------------------------------- loaders
