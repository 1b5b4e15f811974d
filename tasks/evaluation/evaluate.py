"""Evaluate stage: teacher, student and int8 student on the same held-out test split.

Run with ``dvc repro evaluate`` (or ``python -m flows.evaluate``). Reads
``seed``, ``evaluate`` and ``mlflow.experiment``. Scores come from the fp32
checkpoints in PyTorch and the int8 model in ONNX Runtime. Latency is measured
in every runtime a variant can ship in (PyTorch eager and ONNX Runtime fp32 for
the fp32 variants, ONNX Runtime int8 for the int8 one), on the CPU with
``evaluate.num_threads`` threads, after warm-up, interleaved in one process
(``tasks/evaluation/latency.py``); each variant reports its fastest runtime at batch 64.
Writes:

- ``metrics/evaluate.json``: one object per variant (scores from
  ``tasks/evaluation/scoring.py``, calibration, bootstrap intervals, robustness, FGSM,
  size, latency per runtime), per compression step a paired comparison, and in
  ``student_int8`` the issue's compression ``targets`` (size, latency, macro-F1);
- ``reports/confusion/<variant>.{csv,png}``: DVC confusion plots and images;
- ``reports/evaluation/``: per-class tables, micro-averaged ROC/PR curves for
  DVC plots, per-class ROC/PR, reliability and Grad-CAM images, the delta
  confusion matrices of each step, and ``report.md`` tying them together.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from tasks.artifacts import atomic_path, write_csv, write_json
from tasks.checkpoints import load_checkpoint
from tasks.data.datasets import ChannelStats, Split
from tasks.evaluation import scoring
from tasks.evaluation.gradcam import grad_cam, pick_examples, plot_grad_cam
from tasks.evaluation.latency import (
    BATCH,
    Latency,
    fastest,
    latency_metrics,
    measure_runtimes,
    tile_batch,
)
from tasks.evaluation.robustness import corrupted_sets, fgsm_accuracy
from tasks.export.onnx_io import export_onnx, onnx_logits, onnx_session, torch_logits
from tasks.metrics import f1_macro_rows
from tasks.models import count_params
from tasks.orchestration import stage_task
from tasks.params import EvaluateParams
from tasks.transforms import normalise

VARIANTS = ("teacher", "student", "student_int8")
Predict = Callable[[np.ndarray], np.ndarray]  # normalised NCHW float32 -> logits
TORCH_EAGER = f"torch-{torch.__version__.split('+')[0]}-eager"
ORT_FP32 = f"onnxruntime-{ort.__version__}-fp32"
ORT_INT8 = f"onnxruntime-{ort.__version__}-int8"


@dataclass(frozen=True)
class Variant:
    """A model as it ships: how to run it, where its artifact is, what made it.

    ``predict`` gives the scores; ``runtimes`` runs the same network in each
    runtime it can ship in, for the latency comparison.
    """

    name: str
    predict: Predict
    artifact: Path
    runtimes: Mapping[str, Predict]
    params: int
    classes: tuple[str, ...]
    stats: ChannelStats
    run_params: dict[str, Any]
    source_run_id: str | None
    class_prior: tuple[float, ...] | None = None  # what logit adjustment divides out
    module: torch.nn.Module | None = None  # the PyTorch network, for Grad-CAM (fp32 only)


def _torch_predict(model: torch.nn.Module) -> Predict:
    return lambda x: torch_logits(model, x, batch_size=len(x))


def _onnx_predict(session: ort.InferenceSession) -> Predict:
    return lambda x: onnx_logits(session, x, batch_size=len(x))


def _teacher_session(
    model: torch.nn.Module, input_shape: tuple[int, int, int], threads: int
) -> ort.InferenceSession:
    """An ONNX Runtime session of ``model``, exported on the fly: only to time it.

    The quantize stage exports the student, not the teacher; this file is not an
    artifact, so it lives in a temporary folder (the session keeps the graph in memory).
    """
    with tempfile.TemporaryDirectory() as scratch:
        return onnx_session(export_onnx(model, input_shape, Path(scratch) / "t.onnx", {}), threads)


@stage_task(name="load-variants")
def load_variants(
    teacher: Path, student: Path, student_fp32_onnx: Path, student_int8: Path, threads: int
) -> list[Variant]:
    """The three variants, each ready to predict on normalised images in each of its runtimes.

    ``student_fp32_onnx`` is the quantize stage's fp32 export of the student
    (what the int8 model was made from); the teacher is exported here.
    """
    torch.set_num_threads(threads)
    variants = []
    for name, path in (("teacher", teacher), ("student", student)):
        checkpoint = load_checkpoint(path)
        model = checkpoint.build()
        if name == "student":
            session = onnx_session(student_fp32_onnx, threads)
        else:
            shape = (checkpoint.in_channels, checkpoint.image_size, checkpoint.image_size)
            session = _teacher_session(model, shape, threads)
        eager = _torch_predict(model)
        variants.append(
            Variant(
                name=name,
                predict=eager,
                artifact=path,
                runtimes={TORCH_EAGER: eager, ORT_FP32: _onnx_predict(session)},
                params=count_params(model),
                classes=checkpoint.classes,
                stats=checkpoint.stats,
                run_params=checkpoint.params,
                source_run_id=checkpoint.mlflow_run_id,
                class_prior=checkpoint.class_prior,
                module=model,
            )
        )
    int8 = _onnx_predict(onnx_session(student_int8, threads))
    student_variant = variants[1]
    metadata = {p.key: p.value for p in onnx.load(student_int8).metadata_props}
    quantization = json.loads(metadata.get("quantization", "{}"))
    variants.append(
        Variant(
            name="student_int8",
            predict=int8,
            artifact=student_int8,
            runtimes={ORT_INT8: int8},
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


@stage_task(name="measure-latency")
def measure_variants_latency(
    variants: list[Variant], images: np.ndarray, params: EvaluateParams
) -> dict[str, dict[str, Latency]]:
    """Every runtime of every variant, timed back to back on the same test images.

    One call for all of them, so the int8 model and the fp32 runtimes it is
    compared with see the same machine at the same time.
    """
    torch.set_num_threads(params.num_threads)  # ONNX Runtime sessions have theirs
    batch = tile_batch(np.asarray(images), BATCH)
    runtimes = {
        (variant.name, runtime): (predict, normalise(batch, variant.stats))
        for variant in variants
        for runtime, predict in variant.runtimes.items()
    }
    measured = measure_runtimes(runtimes, params.latency_warmup, params.latency_repeats)
    by_variant: dict[str, dict[str, Latency]] = {variant.name: {} for variant in variants}
    for (name, runtime), latency in measured.items():
        by_variant[name][runtime] = latency
    return by_variant


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    predicted: np.ndarray
    probs: np.ndarray  # (N, C) test probabilities, after any logit adjustment and temperature


def _logits(variant: Variant, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of uint8 NHWC ``images``, normalised with the variant's own stats."""
    return np.concatenate(
        [
            variant.predict(normalise(images[i : i + batch_size], variant.stats))
            for i in range(0, len(images), batch_size)
        ]
    )


@stage_task(name="corrupt-test")
def corrupt_test(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    return corrupted_sets(images, seed)


@stage_task(name="evaluate-variant")
def evaluate_variant(
    variant: Variant,
    test: Split,
    val: Split,
    params: EvaluateParams,
    seed: int,
    latency: Mapping[str, Latency],
    corrupted: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """Scores, calibration and cost of one variant on the test split.

    Logit adjustment (``logit_adjust_tau``) changes predictions; a temperature
    fitted on the validation split (``temperature_scaling``) changes only the
    confidence, so the ECE is reported before and after it. ``latency`` is the
    variant's per runtime (``measure_variants_latency``). ``corrupted`` holds
    the test images under each fixed corruption (``tasks/evaluation/robustness.py``).
    """
    tau, prior = params.logit_adjust_tau, variant.class_prior
    logits = adjust_logits(_logits(variant, test.images, params.batch_size), prior, tau)
    raw = scoring.probabilities(logits)
    temperature = 1.0
    if params.temperature_scaling:
        val_logits = adjust_logits(_logits(variant, val.images, params.batch_size), prior, tau)
        temperature = scoring.fit_temperature(val_logits, val.labels)
    probs = scoring.probabilities(logits, temperature)
    predicted = probs.argmax(axis=1)
    labels = np.asarray(test.labels)
    num_classes = len(variant.classes)
    samples = params.bootstrap_samples
    metrics = {
        **scoring.classification_report(labels, probs, variant.classes, params.top_k),
        "f1_macro_ci": list(
            scoring.bootstrap_ci(
                labels, predicted, lambda y, p: f1_macro_rows(y, p, num_classes), samples, seed
            )
        ),
        "accuracy_ci": list(
            scoring.bootstrap_ci(
                labels, predicted, lambda y, p: np.mean(y == p, axis=-1), samples, seed
            )
        ),
        "ece": scoring.expected_calibration_error(raw, labels, params.calibration_bins),
        "temperature": temperature,
        "ece_temperature_scaled": scoring.expected_calibration_error(
            probs, labels, params.calibration_bins
        ),
        "params": variant.params,
        "size_bytes": variant.artifact.stat().st_size,
        **latency_metrics(latency),  # the fastest runtime's numbers, and every runtime's
        "logit_adjust_tau": tau,
    }
    if corrupted:
        robustness = {
            name: float(
                (
                    adjust_logits(_logits(variant, images, params.batch_size), prior, tau).argmax(1)
                    == labels
                ).mean()
            )
            for name, images in corrupted.items()
        }
        metrics["robustness"] = robustness  # accuracy under each corruption
        metrics["robustness_mean"] = float(np.mean(list(robustness.values())))
    if params.adversarial and variant.module is not None:
        metrics["fgsm"] = fgsm_accuracy(
            variant.module, np.asarray(test.images), labels, variant.stats,
            params.adversarial_epsilons, params.batch_size,
        )  # fmt: skip
    return Evaluation(metrics, predicted, probs)


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


# Each compression step, as (reference, candidate): what it costs is candidate - reference.
STEPS = (("teacher", "student"), ("student", "student_int8"))


@stage_task(name="compare-steps")
def compare_steps(
    evaluations: dict[str, Evaluation],
    labels: np.ndarray,
    classes: tuple[str, ...],
    samples: int,
    seed: int,
    out_dir: Path,
) -> dict[str, tuple[dict[str, Any], list[Path]]]:
    """Per compression step: the paired test and the delta confusion matrix (CSV and PNG)."""
    steps = {}
    for reference, candidate in STEPS:
        ref, cand = evaluations[reference].predicted, evaluations[candidate].predicted
        comparison = scoring.paired_comparison(labels, ref, cand, len(classes), samples, seed)
        matrix = scoring.delta_confusion(labels, ref, cand, len(classes))
        name = f"delta_{candidate}_vs_{reference}"
        csv_path = write_csv(
            out_dir / f"{name}.csv",
            [
                {"actual": classes[i], "predicted": classes[j], "delta": int(matrix[i, j])}
                for i, j in np.ndindex(*matrix.shape)
            ],
        )
        png = plot_delta(matrix, classes, f"{candidate} minus {reference} (test)",
                         out_dir / f"{name}.png")  # fmt: skip
        steps[candidate] = ({f"vs_{reference}": comparison}, [csv_path, png])
    return steps


# The targets for int8 against the fp32 student it was quantized from; each is an
# upper bound on value. Constants, not params: they are what the work is judged against.
TARGETS = {
    "size_ratio": 0.3,  # int8 ONNX bytes / fp32 student ONNX bytes
    "latency_ratio_b64": 0.7,  # int8 ms per batch of 64 / the student's fastest fp32 runtime's
    "f1_macro_drop": 0.003,  # fp32 student f1_macro - int8 f1_macro: 0.3 points
}
# Slack for float rounding, so that e.g. 0.983 - 0.980 still meets a 0.003 bound.
_TOLERANCE = 1e-9


def compression_targets(
    fp32_onnx_bytes: int,
    int8_onnx_bytes: int,
    student_latency: Mapping[str, Latency],
    int8_latency: Latency,
    student_f1_macro: float,
    int8_f1_macro: float,
) -> dict[str, dict[str, Any]]:
    """Each target: the measured ``value``, the ``target`` bound, ``met``, and what it compares
    against. Latency is held against the student's fastest fp32 runtime, not only eager PyTorch.
    """
    reference = fastest(student_latency)
    measured = {
        "size_ratio": (int8_onnx_bytes / fp32_onnx_bytes, "fp32 student ONNX file"),
        "latency_ratio_b64": (
            int8_latency.latency_ms_b64 / student_latency[reference].latency_ms_b64,
            f"student in {reference}, its fastest fp32 runtime at batch 64",
        ),
        "f1_macro_drop": (student_f1_macro - int8_f1_macro, "fp32 student f1_macro (test)"),
    }
    return {
        key: {
            "value": value,
            "target": TARGETS[key],
            "met": bool(value <= TARGETS[key] + _TOLERANCE),
            "reference": against,
        }
        for key, (value, against) in measured.items()
    }


BASELINES = "baselines"  # evaluate.json's one top-level key that is not a variant


def variant_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The variants of an evaluate.json, without its ``baselines``."""
    return {name: m for name, m in results.items() if name != BASELINES}


def report_markdown(results: dict[str, dict[str, Any]], classes: tuple[str, ...]) -> str:
    """Everything one run's evaluation found, as one markdown page beside its images."""
    lines = ["# visionpipe evaluation (test split)", "", comparison_markdown(results), ""]
    results = variant_results(results)
    variants = list(results)
    lines += [
        "## Per class: F1 (precision / recall), support",
        "",
        "| class | " + " | ".join(variants) + " | support |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    first = results[variants[0]]
    for name in classes:
        cells = [
            f"{m['f1_per_class'][name]:.3f} ({m['precision_per_class'][name]:.2f} / "
            f"{m['recall_per_class'][name]:.2f})"
            for m in results.values()
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {first['support_per_class'][name]} |"
        )
    if all("robustness" in m for m in results.values()):
        lines += [
            "",
            "## Robustness: accuracy under fixed corruptions",
            "",
            "| corruption | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        lines.append(
            "| none | " + " | ".join(f"{m['accuracy']:.3f}" for m in results.values()) + " |"
        )
        for corruption in first["robustness"]:
            cells = [f"{m['robustness'][corruption]:.3f}" for m in results.values()]
            lines.append(f"| {corruption} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Calibration",
        "",
        "| variant | ECE | temperature (fitted on val) | ECE after | reliability diagram |",
        "|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['ece']:.4f} | {m['temperature']:.3f} | "
            f"{m['ece_temperature_scaled']:.4f} | ![]({name}_reliability.png) |"
        )
    lines += ["", "## What each compression step costs", ""]
    for reference, candidate in STEPS:
        lines.append(f"![{candidate} minus {reference}](delta_{candidate}_vs_{reference}.png)")
    lines += ["", "## ROC and precision-recall curves", ""]
    lines += [f"![{name}]({name}_roc_pr.png)" for name in variants]
    lines += ["", "## Grad-CAM", ""]
    lines += [f"![{name}]({name}_grad_cam.png)" for name in variants if name != "student_int8"]
    return "\n".join(lines) + "\n"


@stage_task(name="write-evaluate-metrics")
def write_metrics(path: Path, results: dict[str, dict[str, Any]]) -> dict:
    write_json(path, results)
    return results


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The trade-off at a glance: one row per variant, latency per runtime, compression targets.

    Latency columns are the variant's fastest runtime at batch 64 (``runtime``).
    """
    header = (
        "| variant | f1_macro | f1_macro 95% CI | accuracy | ECE | params | size_bytes "
        "| latency_ms_b1 | latency_ms_b64 | throughput_ips_b64 | runtime |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    # What learning nothing scores on the same test split (tasks/data/baselines.py).
    for name, b in results.get(BASELINES, {}).items():
        lines.append(
            f"| baseline: {name} | {b['f1_macro']:.4f} | — | {b['accuracy']:.4f} | — | — | — "
            "| — | — | — | — |"
        )
    results = variant_results(results)
    for name, m in results.items():
        # an evaluate.json written before confidence intervals, ECE and batch 64 has none
        ci = "[{:.4f}, {:.4f}]".format(*m["f1_macro_ci"]) if "f1_macro_ci" in m else "—"
        ece = f"{m['ece']:.4f}" if "ece" in m else "—"
        b64 = f"{m['latency_ms_b64']:.3f}" if "latency_ms_b64" in m else "—"
        ips = f"{m['throughput_ips_b64']:,.0f}" if "throughput_ips_b64" in m else "—"
        lines.append(
            f"| {name} | {m['f1_macro']:.4f} | {ci} | {m['accuracy']:.4f} | {ece} "
            f"| {m['params']:,} | {m['size_bytes']:,} | {m['latency_ms_b1']:.3f} | {b64} | {ips} "
            f"| {m['runtime']} |"
        )
    steps = [
        (name, key, m[key]) for name, m in results.items() for key in m if key.startswith("vs_")
    ]
    if steps:
        lines += ["", "| step | f1_macro delta | 95% CI | McNemar p |", "|---|---|---|---|"]
        for name, key, c in steps:
            low, high = c["f1_macro_delta_ci"]
            lines.append(
                f"| {name} {key.replace('_', ' ')} | {c['f1_macro_delta']:+.4f} "
                f"| [{low:+.4f}, {high:+.4f}] | {c['mcnemar_p']:.3g} |"
            )
    lines += _runtimes_markdown(results)
    lines += _targets_markdown(results)
    return "\n".join(lines)


def _runtimes_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every runtime each variant was timed in; the one it reports is marked."""
    rows = [
        f"| {name} | {runtime} | {r['latency_ms_b1']:.3f} | {r['p95_ms_b1']:.3f} "
        f"| {r['latency_ms_b64']:.3f} | {r['throughput_ips_b64']:,.0f} "
        f"| {'fastest' if runtime == m['runtime'] else ''} |"
        for name, m in results.items()
        for runtime, r in m.get("latency_by_runtime", {}).items()
    ]
    if not rows:
        return []
    return [
        "",
        "## Latency by runtime (ms per call; same threads, same run, interleaved)",
        "",
        "| variant | runtime | latency_ms_b1 | p95_ms_b1 | latency_ms_b64 | throughput_ips_b64 "
        "| reported |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _targets_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """The compression targets, with every miss and every place int8 is slower said in words."""
    lines: list[str] = []
    reference_of = {candidate: reference for reference, candidate in STEPS}
    for name, m in results.items():
        if "targets" not in m:
            continue
        reference = reference_of.get(name, "the fp32 model")
        lines += [
            "",
            f"## Compression targets ({name} vs {reference})",
            "",
            "| target | measured | target | met | against |",
            "|---|---|---|---|---|",
        ]
        for key, t in m["targets"].items():
            met = "yes" if t["met"] else "**NO (missed)**"
            lines.append(
                f"| {key} | {t['value']:.4f} | <= {t['target']:g} | {met} | {t['reference']} |"
            )
        missed = [(key, t) for key, t in m["targets"].items() if not t["met"]]
        lines.append("")
        if missed:
            lines.append(
                f"**{len(missed)} of {len(m['targets'])} targets missed:** "
                + "; ".join(
                    f"{key} is {t['value']:.4f}, above the target {t['target']:g}"
                    for key, t in missed
                )
                + "."
            )
        else:
            lines.append("All compression targets met.")
        lines += _slower_notes(name, m, results.get(reference, {}))
    return lines


def _slower_notes(name: str, int8: dict[str, Any], fp32: dict[str, Any]) -> list[str]:
    """One line per fp32 runtime and batch size where ``name`` is slower than its reference."""
    notes = []
    for runtime, r in fp32.get("latency_by_runtime", {}).items():
        for key, batch in (("latency_ms_b1", 1), ("latency_ms_b64", 64)):
            mine = int8.get(key)
            if mine is not None and mine > r[key]:
                notes.append(
                    f"- {name} ({int8['runtime']}) is slower than the fp32 model in {runtime} "
                    f"at batch {batch}: {mine:.3f} vs {r[key]:.3f} ms per call "
                    f"({mine / r[key]:.2f}x)."
                )
    return ["", *notes] if notes else []
