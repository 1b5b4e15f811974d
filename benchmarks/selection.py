"""Which checkpoint should a fit keep? Selection rules compared on the same trajectories.

    python benchmarks/selection.py [--stage train|distill] [--seeds 0 1 2]
                                   [--half-lives 1 2 4] [--repo PATH] [--smoke]
    # after `dvc repro resample` (--stage train) or `dvc repro train` (--stage distill)

The train and distill stages keep the epoch with the best val macro-F1
(``tasks.training.engine.fit``), or with ``ema_half_life`` the best epoch of an
exponential moving average of the weights. On a small val split the best of
many epochs is partly luck: its val score overstates its test score. This
measures, per seed, one fit of the stage (``fit_teacher`` or ``fit_student``,
exactly as the stage calls it, run to the end of its schedule) and watches it
from outside: after every epoch the raw weights and an EMA of them for each
``--half-lives`` value (updated after every optimizer step, as ``fit`` does)
are scored on val and on test. An EMA never changes the trajectory, so one fit
answers every rule:

- ``raw best``: what the stage keeps by default; early stopping with
  ``patience`` simulated exactly as ``fit`` stops;
- ``raw last``: the end of the one-cycle schedule (no selection at all);
- ``raw smooth3``: the epoch whose val macro-F1 averaged with its two
  neighbours is highest (selection smoothed over epochs);
- ``ema H best`` / ``ema H last``: the stage with ``ema_half_life: H``.

Test scores are a report, never a selection. Writes
``benchmarks/results/selection_<stage>_<source>_<device>.json`` and prints a
markdown table: per rule, test macro-F1 and accuracy (mean over seeds), the
val-test gap (kept val macro-F1 minus test), epochs run, and on how many seeds
it beat ``raw best``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.optim.swa_utils import AveragedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from tasks.layout import PREPARED_DIR, RESAMPLED_DIR, TEACHER  # noqa: E402
from tasks.params import FitParams, load_params  # noqa: E402
from tasks.training import engine  # noqa: E402
from tasks.training.distill import fit_student, load_teacher  # noqa: E402
from tasks.training.engine import Budget  # noqa: E402
from tasks.training.inputs import TrainingData, load_training_data  # noqa: E402
from tasks.training.loaders import make_loader  # noqa: E402
from tasks.training.train import fit_teacher  # noqa: E402

SMOKE_FIT = {"epochs": 3, "min_steps": 0}


@dataclass(frozen=True)
class Score:
    """One model's scores after one epoch."""

    val_f1: float
    val_loss: float
    test_f1: float
    test_accuracy: float


@dataclass
class Trajectory:
    """Every epoch's scores per stream ("raw", "ema 2", ...), and the fit's step budget."""

    streams: dict[str, list[Score]] = field(default_factory=dict)
    steps_per_epoch: int = 0


@contextmanager
def watch(data: TrainingData, half_lives: list[float], batch_size: int) -> Iterator[Trajectory]:
    """Score every epoch of the ``fit`` run inside the block, raw and averaged, on val and test.

    ``fit`` hands its model to ``engine.weight_ema`` once at the start and its
    judged model to ``engine._validate`` after every epoch; this wraps both
    (training itself is untouched: the stage's own ``ema_half_life`` must be 0)
    and updates one ``AveragedModel`` per half-life after every optimizer step.
    """
    trajectory = Trajectory()
    averages: dict[str, AveragedModel] = {}
    watched: list[nn.Module] = []
    test_loader = make_loader(data.prepared.test, data.prepared.stats, batch_size, seed=0)
    weight_ema, validate = engine.weight_ema, engine._validate

    def start(model: nn.Module, half_life: float, steps_per_epoch: int):
        if half_life:
            raise ValueError("selection.watch: the fit's own ema_half_life must be 0")
        watched.append(model)
        trajectory.steps_per_epoch = steps_per_epoch
        for life in half_lives:
            averages[f"ema {life:g}"] = weight_ema(model, life, steps_per_epoch)
        return None

    def after_step(*_: Any) -> None:
        if watched:
            for average in averages.values():
                average.update_parameters(watched[0])

    def judge(model: nn.Module, val_loader, device: torch.device):
        judged = validate(model, val_loader, device)  # (loss, accuracy, macro-F1)
        for name, scored in (("raw", model), *((n, a.module) for n, a in averages.items())):
            val_loss, _, val_f1 = judged if name == "raw" else validate(scored, val_loader, device)
            _, test_accuracy, test_f1 = validate(scored, test_loader, device)
            scores = Score(val_f1, val_loss, test_f1, test_accuracy)
            trajectory.streams.setdefault(name, []).append(scores)
        return judged

    hook = register_optimizer_step_post_hook(after_step)
    engine.weight_ema, engine._validate = start, judge
    try:
        yield trajectory
    finally:
        engine.weight_ema, engine._validate = weight_ema, validate
        hook.remove()


def best_with_patience(scores: list[float], losses: list[float], patience: int,
                       may_stop: Callable[[int], bool]) -> tuple[int, int]:  # fmt: skip
    """(kept epoch, epochs run), 1-based: ``fit``'s rule (best val macro-F1, ties to the lower
    val loss; stop after ``patience`` epochs without a better one, once ``may_stop``)."""
    best_key, best, stale = (float("-inf"), float("-inf")), 0, 0
    for epoch, (score, loss) in enumerate(zip(scores, losses, strict=True), start=1):
        if (score, -loss) > best_key:
            best_key, best, stale = (score, -loss), epoch, 0
        else:
            stale += 1
            if stale >= patience and may_stop(epoch):
                return best, epoch
    return best, len(scores)


def smoothed(scores: list[float]) -> list[float]:
    """Each epoch's score averaged with its neighbours (two at the ends)."""
    return [statistics.fmean(scores[max(0, i - 1) : i + 2]) for i in range(len(scores))]


def apply_rules(trajectory: Trajectory, params: FitParams) -> dict[str, dict[str, Any]]:
    """Every rule's kept epoch on ``trajectory``, with its val and test scores."""
    budget = Budget.of(params, trajectory.steps_per_epoch)
    kept: dict[str, tuple[str, int, int]] = {}  # rule -> (stream, epoch kept, epochs run)
    for name, scores in trajectory.streams.items():
        f1s, losses = [s.val_f1 for s in scores], [s.val_loss for s in scores]
        kept[f"{name} best"] = (name, *best_with_patience(f1s, losses, params.patience,
                                                           budget.may_stop_after))  # fmt: skip
        kept[f"{name} last"] = (name, len(scores), len(scores))
        if name == "raw":
            averaged = smoothed(f1s)
            kept["raw smooth3"] = ("raw", averaged.index(max(averaged)) + 1, len(scores))
    rules = {}
    for rule, (name, epoch, run) in kept.items():
        score = trajectory.streams[name][epoch - 1]
        rules[rule] = {
            "epoch": epoch, "epochs_run": run, "val_f1_macro": score.val_f1,
            "test_f1_macro": score.test_f1, "test_accuracy": score.test_accuracy,
            "val_test_gap": score.val_f1 - score.test_f1,
        }  # fmt: skip
    return rules


def summarise(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per rule: means over seeds, and seeds won and lost against ``raw best``."""
    summary = {}
    for rule in per_seed[0]:
        rows = [seed[rule] for seed in per_seed]
        gains = [row["test_f1_macro"] - seed["raw best"]["test_f1_macro"]
                 for row, seed in zip(rows, per_seed, strict=True)]  # fmt: skip
        summary[rule] = {
            **{key: statistics.fmean(row[key] for row in rows)
               for key in ("test_f1_macro", "test_accuracy", "val_test_gap", "epochs_run")},
            "test_f1_macro_sd": statistics.stdev(r["test_f1_macro"] for r in rows)
            if len(rows) > 1 else 0.0,
            "vs_raw_best": statistics.fmean(gains),
            "seeds_won": sum(gain > 0 for gain in gains),
            "seeds_lost": sum(gain < 0 for gain in gains),
        }  # fmt: skip
    return summary


def _quiet(_: str) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["train", "distill"], default="train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--half-lives", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="a checkout where `dvc repro resample` (train) or "
                             "`dvc repro train` (distill) has run")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="seed 0, half-life 1, three epochs: does the script run? "
                             "(selection_*_smoke.json)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.half_lives = [0], [1.0]

    os.chdir(args.repo)  # the stage's own relative paths: data/, models/
    params = load_params("params.yaml")
    data = load_training_data.fn(PREPARED_DIR, RESAMPLED_DIR)
    section = params.train if args.stage == "train" else params.distill
    # the stage's own settings, run to the end of its schedule (patience is applied afterwards)
    update = {**(SMOKE_FIT if args.smoke else {}), "ema_half_life": 0.0, "patience": 10**9}
    fitted = section.model_copy(update=update)
    judged = section.model_copy(update=SMOKE_FIT if args.smoke else {})
    teacher = load_teacher.fn(TEACHER) if args.stage == "distill" else None

    per_seed, seconds = [], []
    for seed in args.seeds:
        with watch(data, args.half_lives, section.batch_size) as trajectory:
            if teacher is None:
                result = fit_teacher.fn(data, fitted, params.augment, seed, log=_quiet)
            else:
                result = fit_student.fn(data, teacher, fitted, params.augment, seed, log=_quiet)
        seconds.append(result.seconds)
        per_seed.append(apply_rules(trajectory, judged))
        raw = per_seed[-1]["raw best"]
        print(f"seed {seed}: {len(trajectory.streams['raw'])} epochs, {result.seconds:.0f} s; "
              f"raw best epoch {raw['epoch']}: val {raw['val_f1_macro']:.4f}, "
              f"test {raw['test_f1_macro']:.4f}", flush=True)  # fmt: skip

    summary = summarise(per_seed)
    device = "cuda" if describe_machine()["gpu"] else "cpu"
    source = Path(str(params.data.source)).name  # as the suite names them: digits-lt50
    source += f"-lt{params.data.imbalance_ratio:g}" if params.data.imbalance_ratio > 1 else ""
    source += f"-{params.data.max_per_class}" if params.data.max_per_class else ""
    seeds = " ".join(map(str, args.seeds))
    lives = " ".join(f"{life:g}" for life in args.half_lives)
    path = write_result(
        result_name(f"selection_{args.stage}_{source}_{device}.json", args.smoke),
        {
            "command": f"python benchmarks/selection.py --stage {args.stage} --seeds {seeds} "
            f"--half-lives {lives}",
            "machine": describe_machine(),
            "data_source": str(params.data.source),
            "stage": args.stage,
            "val_size": len(data.prepared.val.labels),
            "test_size": len(data.prepared.test.labels),
            "params": judged.model_dump(mode="json"),
            "fit_seconds": seconds,
            "summary": summary,
            "per_seed": dict(zip(map(str, args.seeds), per_seed, strict=True)),
        },
    )
    print(f"\n{args.stage}, {len(args.seeds)} seeds, {len(data.prepared.val.labels)} val and "
          f"{len(data.prepared.test.labels)} test images\n")  # fmt: skip
    print(
        "| rule | test macro-F1 | test accuracy | val - test | epochs run | vs raw best "
        "| seeds won / lost |"
    )
    print("|---|---|---|---|---|---|---|")
    for rule, row in summary.items():
        print(f"| {rule} | {row['test_f1_macro']:.4f} +- {row['test_f1_macro_sd']:.4f} "
              f"| {row['test_accuracy']:.4f} | {row['val_test_gap']:+.4f} "
              f"| {row['epochs_run']:.1f} | {row['vs_raw_best']:+.4f} "
              f"| {row['seeds_won']} / {row['seeds_lost']} |")  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
