"""Made-up evaluate results for the tests of targets, the comparison table and MLflow metrics."""

from __future__ import annotations

import numpy as np

from tasks.evaluation.evaluate import compression_targets, student_budget
from tasks.evaluation.latency import (
    Latency,
    latency_metrics,
)
from tasks.evaluation.results import ORT_FP32, ORT_INT8, TORCH_EAGER
from tasks.params import StudentBudget

LATENCY_KEYS = {"latency_ms_b1", "p95_ms_b1", "latency_ms_b64", "throughput_ips_b64"}


def made_up_latency(b1: float, b64: float) -> Latency:
    return Latency(
        latency_ms_b1=b1, p95_ms_b1=b1 * 1.5, latency_ms_b64=b64, throughput_ips_b64=64e3 / b64
    )


STUDENT_LATENCY = {TORCH_EAGER: made_up_latency(0.10, 8.0), ORT_FP32: made_up_latency(0.05, 2.0)}
# eager PyTorch is the teacher's fastest at batch 1, ONNX Runtime at batch 64
TEACHER_LATENCY = {TORCH_EAGER: made_up_latency(0.30, 40.0), ORT_FP32: made_up_latency(0.40, 6.0)}
BUDGET = StudentBudget(max_int8_bytes=1_000_000, max_latency_ratio_b1=0.333)


def evaluate_results(int8_b1: float, int8_b64: float, int8_bytes: int) -> dict:
    row = {"f1_macro": 0.98, "accuracy": 0.98, "params": 24_058, "size_bytes": 100_000}
    student = {**row, **latency_metrics(STUDENT_LATENCY)}
    int8_latency = {ORT_INT8: made_up_latency(int8_b1, int8_b64)}
    int8 = {**row, "size_bytes": int8_bytes, **latency_metrics(int8_latency)}
    int8["targets"] = {
        **compression_targets(100_000, int8_bytes, STUDENT_LATENCY, int8_latency[ORT_INT8],
                              0.98, 0.98),
        **student_budget(int8_bytes, TEACHER_LATENCY, int8_latency[ORT_INT8], BUDGET),
    }  # fmt: skip
    return {"student": student, "student_int8": int8}


# Three classes (cat, dog, eel in the tests): class 2 is never predicted, class 1 too often.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 1, 1, 1, 1, 1])
