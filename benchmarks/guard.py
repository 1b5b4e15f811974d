"""Can selection fool the baseline guard? Real folders with true and with shuffled labels.

    python benchmarks/guard.py [--only NAME ...] [--seeds N]

Each case fits the train stage's own fit (``fit_teacher``, the committed
``train`` params: ``min_steps`` 300, so a 100-image folder runs about 150
epochs, 150 looks at a 15-image val split) on a small from-scratch CNN
(``cnn``, width 8, so the whole matrix takes minutes on 2 cores), then
applies the check the stage applies (``flows.fitting.kept_checkpoint`` and
``tasks.data.baselines.check_fit``), recorded rather than raised. Per folder:
once with the true labels, then with the labels shuffled by each seed. A
shuffled copy must be refused by the significance test; a true one must pass
it. (The margin over the linear baseline is the guard's other, older rule: a
from-scratch CNN on 70 train digits only matches a linear model, which that
rule refuses, rightly, and says so.)

- ``digits-100``, ``digits-1000``: scikit-learn's digits, 10 or 100 per class;
- ``fashion-mnist-5000``: Debian's Fashion-MNIST test file, 500 per class,
  2x2-averaged to 14 px to keep the fit to a minute.

Every fit runs on the CPU. Writes ``benchmarks/results/guard_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, write_result  # noqa: E402
from flows.fitting import kept_checkpoint  # noqa: E402
from tasks.data.baselines import BaselineCheck, check_fit, trivial_baselines  # noqa: E402
from tasks.data.datasets import PreparedData, Split  # noqa: E402
from tasks.data.pixels import ChannelStats  # noqa: E402
from tasks.data.sources import read_idx  # noqa: E402
from tasks.params import Params, load_params  # noqa: E402
from tasks.training.inputs import TrainingData  # noqa: E402
from tasks.training.train import fit_teacher  # noqa: E402

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def digits(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` of each digit, grey levels 0-255."""
    from sklearn.datasets import load_digits

    loaded = load_digits()
    images = (loaded.images * 255 / 16).astype(np.uint8)[..., None]
    rows = np.concatenate([np.flatnonzero(loaded.target == k)[:per_class] for k in range(10)])
    return images[rows], loaded.target[rows].astype(np.int64)


def fashion_mnist(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` of each class of the official test file, at 14 px."""
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    rows = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
    small = images[rows].reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).astype(np.uint8)
    return small[..., None], labels[rows]


# name -> (loader, images per class)
CASES: dict[str, tuple[Callable[[int], tuple[np.ndarray, np.ndarray]], int]] = {
    "digits-100": (digits, 10),
    "digits-1000": (digits, 100),
    "fashion-mnist-5000": (fashion_mnist, 500),
}


def training_data(images: np.ndarray, labels: np.ndarray) -> TrainingData:
    """A stratified 70/15/15 split, as prepare makes it; no resampling."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    train, rest = train_test_split(rows, test_size=0.3, stratify=labels, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=0)
    splits = [Split(images[r], labels[r]) for r in (train, val, test)]
    names = tuple(str(k) for k in range(int(labels.max()) + 1))
    prepared = PreparedData(*splits, names, ChannelStats.of(images))
    return TrainingData(prepared, prepared.train, np.ones(len(train)))


def judge(data: TrainingData, params: Params, seed: int) -> BaselineCheck:
    """Fit as the train stage does (a width-8 CNN from scratch) and apply its check."""
    train = params.train.model_copy(
        update={"model": "cnn", "pretrained": False, "width": 8, "device": "cpu"}
    )
    result = fit_teacher.fn(data, train, params.augment, seed, log=lambda _: None)
    baselines = trivial_baselines(data.prepared, seed)
    kept = kept_checkpoint(result, data, train.keep)
    return check_fit("train", kept, baselines, train.baseline_margin, train.significance,
                     allow_weak=True, warn=lambda _: None)  # fmt: skip


def run_case(name: str, seeds: int, params: Params) -> list[dict[str, Any]]:
    """The true labels once, then ``seeds`` shuffles: one row each."""
    load, per_class = CASES[name]
    images, labels = load(per_class)
    rows = []
    for seed in [None, *range(seeds)]:
        shuffled = seed is not None
        used = np.random.default_rng(seed).permutation(labels) if shuffled else labels
        started = time.perf_counter()
        check = judge(training_data(images, used), params, 0 if seed is None else seed)
        refused = check.not_significant
        rows.append({
            "dataset": name, "images": len(labels), "labels": "shuffled" if shuffled else "true",
            "seed": seed, **check.metrics(), "kept_val_f1_macro": check.selection.f1_macro,
            "kept_val_accuracy": check.selection.accuracy, "significance_refused": refused,
            "as_expected": refused == shuffled,
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(f"  {name} {rows[-1]['labels']} seed={seed}: p={check.p_value:.3g} "
              f"refused={refused}", flush=True)  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | labels | seed | val size | looks | kept val F1 | kept val acc "
        "| label-blind acc | p x looks | refused | as expected |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['labels']} | {'' if r['seed'] is None else r['seed']} "
            f"| {r['val_size']} | {r['selection_looks']} | {r['kept_val_f1_macro']:.3f} "
            f"| {r['kept_val_accuracy']:.3f} | {r['label_blind_val_accuracy']:.3f} "
            f"| {r['guard_p_value']:.3g} | {r['significance_refused']} | {r['as_expected']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="these folders only")
    parser.add_argument("--seeds", type=int, default=3, help="shuffled copies per folder")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    rows: list[dict[str, Any]] = []
    for name in args.only or list(CASES):
        print(f"{name}:", flush=True)
        rows.extend(run_case(name, args.seeds, params))
    command = " ".join(["python", "benchmarks/guard.py", *sys.argv[1:]])
    path = write_result(
        "guard_cpu_partial.json" if args.only else "guard_cpu.json",
        {"command": command, "machine": describe_machine(), "runs": rows,
         "all_as_expected": all(r["as_expected"] for r in rows)},
    )  # fmt: skip
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
