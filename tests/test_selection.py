"""benchmarks/selection.py: its rules match what ``fit`` keeps, and watching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from torch.optim import optimizer as torch_optimizer

from benchmarks.selection import apply_rules, best_with_patience, smoothed, summarise, watch
from tasks.data.datasets import PreparedData
from tasks.params import Params
from tasks.training import engine
from tasks.training.distill import score
from tasks.training.inputs import TrainingData
from tasks.training.train import fit_teacher


def test_best_with_patience_stops_as_fit_does_and_breaks_ties_on_the_loss() -> None:
    f1s = [0.2, 0.5, 0.5, 0.4, 0.3, 0.9]
    losses = [1.0, 0.8, 0.7, 0.9, 0.9, 0.1]
    # epoch 3 ties epoch 2 on F1 with a lower loss; two stale epochs then stop it
    assert best_with_patience(f1s, losses, patience=2, may_stop=lambda epoch: True) == (3, 5)
    # no stop before epoch 6: the last epoch's 0.9 is kept
    assert best_with_patience(f1s, losses, patience=2, may_stop=lambda e: e >= 6) == (6, 6)
    assert smoothed([0.0, 0.3, 0.6, 0.0]) == pytest.approx([0.15, 0.3, 0.3, 0.3])


@pytest.fixture
def fit_setup(params: Params, tiny_prepared: PreparedData):
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    train = params.train.model_copy(update={
        "model": "cnn", "pretrained": False, "width": 4, "batch_size": 8, "device": "cpu",
        "epochs": 6, "min_steps": 0, "patience": 2, "lr": 0.01,
    })  # fmt: skip
    return data, train, params.augment


def test_watched_rules_are_what_fit_keeps_raw_and_with_an_ema(fit_setup) -> None:
    data, train, augment = fit_setup
    whole = train.model_copy(update={"patience": 10**9})
    with watch(data, [1.0], train.batch_size) as trajectory:
        watched = fit_teacher.fn(data, whole, augment, seed=3, log=lambda _: None)
    assert set(trajectory.streams) == {"raw", "ema 1"}
    assert all(len(scores) == 6 for scores in trajectory.streams.values())
    rules = apply_rules(trajectory, train)
    assert set(rules) == {"raw best", "raw last", "raw smooth3", "ema 1 best", "ema 1 last"}

    # Watching changed nothing: the full-schedule fit keeps the same epoch as before
    whole_rule = apply_rules(trajectory, whole)["raw best"]
    assert watched.best_epoch == whole_rule["epoch"]
    assert watched.best_val_f1_macro == pytest.approx(whole_rule["val_f1_macro"])
    assert score(watched.model, data, "test", 8).f1_macro == pytest.approx(
        whole_rule["test_f1_macro"]
    )
    # ...and with patience, the stage's own early stop lands where the rule says
    for half_life, rule in ((0.0, "raw best"), (1.0, "ema 1 best")):
        stage = fit_teacher.fn(data, train.model_copy(update={"ema_half_life": half_life}),
                               augment, seed=3, log=lambda _: None)  # fmt: skip
        assert (stage.best_epoch, len(stage.history)) == (
            rules[rule]["epoch"],
            rules[rule]["epochs_run"],
        ), rule
        assert stage.best_val_f1_macro == pytest.approx(rules[rule]["val_f1_macro"])
        test = score(stage.model, data, "test", 8)
        assert test.f1_macro == pytest.approx(rules[rule]["test_f1_macro"])
        assert test.accuracy == pytest.approx(rules[rule]["test_accuracy"])


def test_watch_refuses_a_fit_that_averages_itself_and_unhooks_after(fit_setup) -> None:
    data, train, augment = fit_setup
    averaging = train.model_copy(update={"ema_half_life": 1.0, "epochs": 1})
    hooks = dict(torch_optimizer._global_optimizer_post_hooks)
    functions = (engine.weight_ema, engine._validate)
    refused = pytest.raises(ValueError, match="ema_half_life must be 0")
    with refused, watch(data, [1.0], train.batch_size):
        fit_teacher.fn(data, averaging, augment, seed=0, log=lambda _: None)
    assert (engine.weight_ema, engine._validate) == functions
    assert torch_optimizer._global_optimizer_post_hooks == hooks


def test_summarise_counts_seeds_won_and_lost_against_the_default_rule() -> None:
    def rules(raw: float, ema: float):
        row = {"test_accuracy": 0.5, "val_test_gap": 0.1, "epochs_run": 4}
        return {
            "raw best": {**row, "test_f1_macro": raw},
            "ema 2 best": {**row, "test_f1_macro": ema},
        }

    summary = summarise([rules(0.5, 0.6), rules(0.5, 0.4), rules(0.5, 0.7)])
    assert summary["ema 2 best"]["seeds_won"] == 2 and summary["ema 2 best"]["seeds_lost"] == 1
    assert summary["ema 2 best"]["vs_raw_best"] == pytest.approx((0.1 - 0.1 + 0.2) / 3)
    assert summary["raw best"]["vs_raw_best"] == 0.0 and summary["raw best"]["seeds_won"] == 0
