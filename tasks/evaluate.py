"""Evaluate stage: teacher, student and int8 student on the same held-out test split.

Run with ``dvc repro evaluate`` (or ``python -m flows.evaluate``). Reads
``evaluate`` and ``mlflow.experiment``. Writes ``metrics/evaluate.json`` (one
object per variant), ``reports/confusion/<variant>.csv`` (a DVC confusion
plot) and ``.png``. Each variant runs in the runtime it ships in: the fp32
checkpoints in PyTorch, the int8 model in ONNX Runtime; latency is measured
on the CPU with ``evaluate.num_threads`` threads after warm-up.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import numpy as np
import onnx
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from tasks.artifacts import atomic_path, write_csv, write_json
from tasks.checkpoints import load_checkpoint
from tasks.datasets import ChannelStats, Split
from tasks.metrics import f1_macro
from tasks.models import count_params
from tasks.orchestration import stage_task
from tasks.params import EvaluateParams
from tasks.quantize import onnx_logits, onnx_session, torch_logits
from tasks.transforms import normalise

VARIANTS = ("teacher", "student", "student_int8")
Predict = Callable[[np.ndarray], np.ndarray]  # normalised NCHW float32 -> logits


@dataclass(frozen=True)
class Variant:
    """A model as it ships: how to run it, where its artifact is, what made it."""

    name: str
    predict: Predict
    artifact: Path
    runtime: str
    params: int
    classes: tuple[str, ...]
    stats: ChannelStats
    run_params: dict[str, Any]
    source_run_id: str | None
    class_prior: tuple[float, ...] | None = None  # what logit adjustment divides out


@stage_task(name="load-variants")
def load_variants(teacher: Path, student: Path, student_int8: Path, threads: int) -> list[Variant]:
    """The three variants, each ready to predict on normalised images."""
    torch.set_num_threads(threads)
    variants = []
    for name, path in (("teacher", teacher), ("student", student)):
        checkpoint = load_checkpoint(path)
        model = checkpoint.build()
        variants.append(
            Variant(
                name=name,
                predict=lambda x, m=model: torch_logits(m, x, batch_size=len(x)),
                artifact=path,
                runtime=f"torch-{torch.__version__.split('+')[0]}-eager",
                params=count_params(model),
                classes=checkpoint.classes,
                stats=checkpoint.stats,
                run_params=checkpoint.params,
                source_run_id=checkpoint.mlflow_run_id,
                class_prior=checkpoint.class_prior,
            )
        )
    session = onnx_session(student_int8, threads)
    student_variant = variants[1]
    metadata = {p.key: p.value for p in onnx.load(student_int8).metadata_props}
    quantization = json.loads(metadata.get("quantization", "{}"))
    variants.append(
        Variant(
            name="student_int8",
            predict=lambda x: onnx_logits(session, x, batch_size=len(x)),
            artifact=student_int8,
            runtime="onnxruntime-int8",
            # Quantization changes how weights are stored, not how many there are.
            params=student_variant.params,
            classes=student_variant.classes,
            stats=student_variant.stats,
            run_params={
                **student_variant.run_params,
                **{f"quantize.{key}": value for key, value in quantization.items()},
            },
            source_run_id=student_variant.source_run_id,
            class_prior=student_variant.class_prior,
        )
    )
    return variants


def adjust_logits(logits: np.ndarray, prior: tuple[float, ...] | None, tau: float) -> np.ndarray:
    r"""Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit
    adjustment", ICLR 2021): :math:`f_c(x) - \tau \log \pi_c`.

    A model trained on a long-tailed prior :math:`\pi` is biased towards the
    head classes; subtracting :math:`\tau \log \pi` moves the decision
    thresholds towards the tail (``tau = 1`` is the Bayes-optimal correction for
    the balanced error). ``tau = 0`` or an unknown prior leaves the logits as they are.
    """
    if tau == 0.0 or prior is None:
        return logits
    log_prior = np.log(np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None))
    return (logits - tau * log_prior).astype(logits.dtype)


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """The contract's metric names, computed by scikit-learn."""
    all_labels = np.arange(len(classes))
    per_class = f1_score(labels, predicted, labels=all_labels, average=None, zero_division=0)

    def averaged(score: Callable[..., float], average: str) -> float:
        return float(score(labels, predicted, labels=all_labels, average=average, zero_division=0))

    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1_macro": f1_macro(labels, predicted, len(classes)),
        "f1_weighted": averaged(f1_score, "weighted"),
        "precision_macro": averaged(precision_score, "macro"),
        "recall_macro": averaged(recall_score, "macro"),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "f1_per_class": {name: float(f) for name, f in zip(classes, per_class, strict=True)},
    }


def measure_latency(predict: Predict, sample: np.ndarray, warmup: int, repeats: int) -> dict:
    """Median and p95 wall time of ``predict(sample)``, in ms per image, after warm-up."""
    for _ in range(warmup):
        predict(sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(sample)
        times.append((time.perf_counter() - start) * 1000.0 / len(sample))
    # "inclusive" interpolates between measured times; the default extrapolates past them.
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 1 else times[0]
    return {"median_ms": statistics.median(times), "p95_ms": p95}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    predicted: np.ndarray


@stage_task(name="evaluate-variant")
def evaluate_variant(variant: Variant, test: Split, params: EvaluateParams) -> Evaluation:
    images = normalise(test.images, variant.stats)
    logits = np.concatenate(
        [
            variant.predict(images[i : i + params.batch_size])
            for i in range(0, len(images), params.batch_size)
        ]
    )
    predicted = adjust_logits(logits, variant.class_prior, params.logit_adjust_tau).argmax(axis=1)
    latency = measure_latency(
        variant.predict, images[:1], params.latency_warmup, params.latency_repeats
    )
    metrics = {
        **classification_metrics(test.labels, predicted, variant.classes),
        "params": variant.params,
        "size_bytes": variant.artifact.stat().st_size,
        "latency_ms_b1": latency["median_ms"],
        "p95_ms_b1": latency["p95_ms"],
        "runtime": variant.runtime,
        "logit_adjust_tau": params.logit_adjust_tau,
    }
    return Evaluation(metrics, predicted)


def plot_confusion(matrix: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> Path:
    """Rows actual, columns predicted; colour is the row share, numbers are counts."""
    n = len(classes)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0, fontsize=max(5, 11 - n // 8))
    ax.set_yticks(range(n), classes, fontsize=max(5, 11 - n // 8))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


@stage_task(name="write-confusion")
def write_confusion(
    variant: str, labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...],
    out_dir: Path,
) -> tuple[Path, Path]:  # fmt: skip
    """One row per test image for ``dvc plots`` (template: confusion) and a PNG."""
    csv_path = write_csv(
        out_dir / f"{variant}.csv",
        [
            {"actual": classes[a], "predicted": classes[p]}
            for a, p in zip(labels.tolist(), predicted.tolist(), strict=True)
        ],
    )
    matrix = confusion_matrix(labels, predicted, labels=np.arange(len(classes)))
    png_path = plot_confusion(matrix, classes, f"{variant} (test)", out_dir / f"{variant}.png")
    return csv_path, png_path


@stage_task(name="write-evaluate-metrics")
def write_metrics(path: Path, results: dict[str, dict[str, Any]]) -> dict:
    write_json(path, results)
    return results


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The trade-off at a glance: one row per variant."""
    header = "| variant | f1_macro | accuracy | params | size_bytes | latency_ms_b1 | runtime |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['f1_macro']:.4f} | {m['accuracy']:.4f} | {m['params']:,} "
            f"| {m['size_bytes']:,} | {m['latency_ms_b1']:.3f} | {m['runtime']} |"
        )
    return "\n".join(lines)
