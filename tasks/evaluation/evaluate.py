"""Evaluate stage: teacher, student and int8 student on the same held-out test split.

Run with ``dvc repro evaluate`` (or ``python -m flows.evaluate``). Reads
``seed``, ``evaluate`` and ``mlflow.experiment``. Scores come from the fp32
checkpoints in PyTorch and the int8 model in ONNX Runtime. Latency is measured
in every runtime a variant can ship in (``variants.py``: PyTorch eager and ONNX
Runtime fp32 for the fp32 variants, ONNX Runtime int8 for the int8 one), on
the CPU with ``evaluate.num_threads`` threads, after warm-up, interleaved in
one process (``latency.py``); each variant reports its fastest runtime at
batch 64. This module scores one variant (``evaluate_variant``: metrics from
``scoring.py``, calibration, bootstrap intervals, robustness and FGSM from
``robustness.py``), compares each compression step and checks the int8
model's compression ``targets`` and ``evaluate.student_budget``. What it writes:

- ``metrics/evaluate.json`` (its keys: ``results.py``): one object per variant,
  per compression step a paired comparison, and in ``student_int8`` the
  ``targets``: size, batch-64 latency and macro-F1 against the fp32 student, and
  the budget's file bytes and single-image latency against the teacher;
- ``reports/confusion/<variant>.{csv,png}``: DVC confusion plots and images,
  and ``reports/evaluation/``: per-class tables, ROC/PR curves, reliability
  and Grad-CAM images, the delta confusion matrices of each step (``plots.py``),
  and ``report.md`` tying them together (``report.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import write_csv, write_json
from tasks.data.datasets import Split
from tasks.data.pixels import normalise
from tasks.evaluation import scoring
from tasks.evaluation.latency import (
    Latency,
    fastest,
    latency_metrics,
)
from tasks.evaluation.plots import plot_delta
from tasks.evaluation.results import STEPS
from tasks.evaluation.robustness import fgsm_accuracy
from tasks.evaluation.scoring import adjust_logits
from tasks.evaluation.variants import Variant
from tasks.inference import probabilities
from tasks.metrics import bootstrap_ci, f1_macro_rows, paired_comparison
from tasks.orchestration import stage_task
from tasks.params import EvaluateParams, StudentBudget


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
    raw = probabilities(logits)
    temperature = 1.0
    if params.temperature_scaling:
        val_logits = adjust_logits(_logits(variant, val.images, params.batch_size), prior, tau)
        temperature = scoring.fit_temperature(val_logits, val.labels)
    probs = probabilities(logits, temperature)
    predicted = probs.argmax(axis=1)
    labels = np.asarray(test.labels)
    num_classes = len(variant.classes)
    samples = params.bootstrap_samples
    metrics = {
        **scoring.classification_report(labels, probs, variant.classes, params.top_k),
        "f1_macro_ci": list(
            bootstrap_ci(
                labels, predicted, lambda y, p: f1_macro_rows(y, p, num_classes), samples, seed
            )
        ),
        "accuracy_ci": list(
            bootstrap_ci(labels, predicted, lambda y, p: np.mean(y == p, axis=-1), samples, seed)
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
        comparison = paired_comparison(labels, ref, cand, len(classes), samples, seed)
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
    return _judged(
        {
            "size_ratio": (int8_onnx_bytes / fp32_onnx_bytes, "fp32 student ONNX file"),
            "latency_ratio_b64": (
                int8_latency.latency_ms_b64 / student_latency[reference].latency_ms_b64,
                f"student in {reference}, its fastest fp32 runtime at batch 64",
            ),
            "f1_macro_drop": (student_f1_macro - int8_f1_macro, "fp32 student f1_macro (test)"),
        },
        TARGETS,
    )


def _judged(
    measured: Mapping[str, tuple[float, str]], bounds: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Each measured ``(value, what it is against)`` held to its upper bound."""
    return {
        key: {
            "value": value,
            "target": bounds[key],
            "met": bool(value <= bounds[key] + _TOLERANCE),
            "reference": against,
        }
        for key, (value, against) in measured.items()
    }


def student_budget(
    int8_onnx_bytes: int,
    teacher_latency: Mapping[str, Latency],
    int8_latency: Latency,
    budget: StudentBudget,
) -> dict[str, dict[str, Any]]:
    """``evaluate.student_budget`` as targets (same shape as ``compression_targets``): the
    int8 file's bytes, and its single-image latency over the teacher's at the teacher's
    fastest fp32 runtime at batch 1, timed in the same interleaved rounds."""
    teacher_runtime = fastest(teacher_latency, batch=1)
    return _judged(
        {
            "int8_bytes": (int8_onnx_bytes, "the int8 ONNX file"),
            "latency_ratio_b1_vs_teacher": (
                int8_latency.latency_ms_b1 / teacher_latency[teacher_runtime].latency_ms_b1,
                f"teacher in {teacher_runtime}, its fastest fp32 runtime at batch 1",
            ),
        },
        {
            "int8_bytes": budget.max_int8_bytes,
            "latency_ratio_b1_vs_teacher": budget.max_latency_ratio_b1,
        },
    )


@stage_task(name="write-evaluate-metrics")
def write_metrics(path: Path, results: dict[str, dict[str, Any]]) -> dict:
    write_json(path, results)
    return results
