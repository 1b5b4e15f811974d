"""The evaluate stage's figures and tables: confusion matrices, reliability, ROC/PR, Grad-CAM.

Every figure is written to a file (matplotlib's Agg backend, never a window):
``write_confusion`` the DVC confusion plot data and image of one variant,
``write_reports`` the per-class tables, curves and delta matrices under
``reports/evaluation/``, ``write_grad_cam`` the saliency grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from tasks.artifacts import atomic_path, write_csv
from tasks.data.datasets import Split
from tasks.data.pixels import normalise
from tasks.evaluation import scoring
from tasks.evaluation.gradcam import grad_cam, pick_examples, plot_grad_cam
from tasks.evaluation.variants import Variant
from tasks.orchestration import stage_task

if TYPE_CHECKING:
    from tasks.evaluation.evaluate import Evaluation


def _matrix_figure(
    values: np.ndarray, classes: tuple[str, ...], title: str, cmap: str, vmin: float, vmax: float
) -> tuple[plt.Figure, plt.Axes]:
    """A class-by-class heatmap, rows actual, that stays legible up to 50 classes."""
    n = len(classes)
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0, fontsize=max(5, 11 - n // 8))
    ax.set_yticks(range(n), classes, fontsize=max(5, 11 - n // 8))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    return fig, ax


def plot_confusion(matrix: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> Path:
    """Rows actual, columns predicted; colour is the row share, numbers are counts."""
    n = len(classes)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    fig, ax = _matrix_figure(share, classes, title, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    return _save(fig, path, dpi=120)


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


def _save(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_reliability(table: dict[str, np.ndarray], ece: float, title: str, path: Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    bins = len(table["count"])
    centres = (np.arange(bins) + 0.5) / bins
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    used = table["count"] > 0
    ax.bar(centres[used], table["accuracy"][used], width=1.0 / bins, edgecolor="black",
           color="tab:blue", label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(table["confidence"][used], table["accuracy"][used], "o", color="tab:orange",
            label="mean confidence")  # fmt: skip
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_roc_pr(
    labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], title: str, path: Path
) -> Path:
    """One-vs-rest ROC and precision-recall curves, one line per class present in the split."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    many = len(classes) > 10  # past ten lines a legend is noise: thin lines, no legend
    for c, name in enumerate(classes):
        truth = labels == c
        if not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        precision, recall, _ = precision_recall_curve(truth, probs[:, c])
        style = {"linewidth": 0.6 if many else 1.2, "label": None if many else name}
        roc_ax.plot(fpr, tpr, **style)
        pr_ax.plot(recall, precision, **style)
    roc_ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall")
    if not many:
        pr_ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_delta(matrix: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> Path:
    """A delta confusion matrix: red cells lost images, blue cells gained them."""
    n = len(classes)
    limit = max(int(np.abs(matrix).max()), 1)
    fig, ax = _matrix_figure(matrix, classes, title, cmap="RdBu", vmin=-limit, vmax=limit)
    if n <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, f"{count:+d}", ha="center", va="center", fontsize=8)
    return _save(fig, path)


def per_class_rows(metrics: dict[str, Any], classes: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        {
            "class": name,
            "precision": metrics["precision_per_class"][name],
            "recall": metrics["recall_per_class"][name],
            "f1": metrics["f1_per_class"][name],
            "support": metrics["support_per_class"][name],
        }
        for name in classes
    ]


@stage_task(name="write-reports")
def write_reports(
    variant: str,
    evaluation: Evaluation,
    labels: np.ndarray,
    classes: tuple[str, ...],
    bins: int,
    out_dir: Path,
) -> list[Path]:
    """Per-class table (CSV), ROC/PR curves (CSV for DVC, PNG), reliability diagram."""
    table = scoring.reliability(evaluation.probs, labels, bins)
    onehot = np.eye(len(classes))[labels].ravel()
    fpr, tpr, _ = roc_curve(onehot, evaluation.probs.ravel())
    precision, recall, _ = precision_recall_curve(onehot, evaluation.probs.ravel())
    return [
        # micro-averaged curves, one line per variant in `dvc plots show`
        write_csv(
            out_dir / f"{variant}_roc.csv",
            [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr, strict=True)],
        ),
        write_csv(
            out_dir / f"{variant}_pr.csv",
            [
                {"recall": float(r), "precision": float(p)}
                for r, p in zip(recall[::-1], precision[::-1], strict=True)
            ],
        ),
        write_csv(
            out_dir / f"{variant}_per_class.csv", per_class_rows(evaluation.metrics, classes)
        ),
        plot_reliability(
            table,
            evaluation.metrics["ece_temperature_scaled"],
            f"{variant} (T={evaluation.metrics['temperature']:.2f})",
            out_dir / f"{variant}_reliability.png",
        ),
        plot_roc_pr(labels, evaluation.probs, classes, variant, out_dir / f"{variant}_roc_pr.png"),
    ]


@stage_task(name="grad-cam")
def write_grad_cam(
    variant: Variant,
    evaluation: Evaluation,
    test: Split,
    per_kind: int,
    seed: int,
    out_dir: Path,
) -> Path | None:
    """Grad-CAM overlays for a fixed sample of correct and misclassified test images."""
    if variant.module is None or per_kind == 0:
        return None
    labels = np.asarray(test.labels)
    picked = pick_examples(labels, evaluation.predicted, per_kind, seed)
    rows = np.concatenate([picked["correct"], picked["misclassified"]])
    images = np.asarray(test.images)[rows]
    predicted = evaluation.predicted[rows]
    cams = grad_cam(
        variant.module,
        torch.from_numpy(normalise(images, variant.stats)),
        torch.as_tensor(predicted, dtype=torch.long),
    )
    names = variant.classes
    titles = [
        f"{'ok' if labels[r] == p else 'WRONG'}: {names[labels[r]]} -> {names[p]}"
        for r, p in zip(rows, predicted, strict=True)
    ]
    title = (
        f"{variant.name}: Grad-CAM of the predicted class, {len(picked['correct'])} correct "
        f"and {len(picked['misclassified'])} misclassified test images"
    )
    return plot_grad_cam(images, cams, titles, title, out_dir / f"{variant.name}_grad_cam.png")
