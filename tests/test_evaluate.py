"""The evaluate stage's compression targets: size, batch-64 latency and macro-F1 drop of int8."""

from __future__ import annotations

import pytest

from tasks.evaluation.evaluate import compression_targets
from tasks.evaluation.results import ORT_FP32
from tests.evaluations import STUDENT_LATENCY, made_up_latency


def test_compression_targets_all_met() -> None:
    targets = compression_targets(
        fp32_onnx_bytes=100_000,
        int8_onnx_bytes=28_000,
        student_latency=STUDENT_LATENCY,
        int8_latency=made_up_latency(0.04, 1.2),
        student_f1_macro=0.983,
        int8_f1_macro=0.980,  # exactly 0.3 points: met despite float rounding
    )
    assert set(targets) == {"size_ratio", "latency_ratio_b64", "f1_macro_drop"}
    assert targets["size_ratio"]["value"] == pytest.approx(0.28)
    # against the fastest fp32 runtime (ONNX Runtime, 2 ms), not eager PyTorch (8 ms)
    assert targets["latency_ratio_b64"]["value"] == pytest.approx(0.6)
    assert ORT_FP32 in targets["latency_ratio_b64"]["reference"]
    assert targets["f1_macro_drop"]["value"] == pytest.approx(0.003)
    assert [t["target"] for t in targets.values()] == [0.3, 0.7, 0.003]
    assert all(t["met"] is True for t in targets.values())


def test_compression_targets_missed() -> None:
    targets = compression_targets(
        fp32_onnx_bytes=101_846,
        int8_onnx_bytes=35_757,
        student_latency=STUDENT_LATENCY,
        # 0.5x eager PyTorch would pass; 2x the fastest fp32 runtime does not
        int8_latency=made_up_latency(0.04, 4.0),
        student_f1_macro=0.98,
        int8_f1_macro=0.97,
    )
    assert targets["size_ratio"]["value"] == pytest.approx(0.3511, abs=1e-4)
    assert targets["latency_ratio_b64"]["value"] == pytest.approx(2.0)
    assert targets["f1_macro_drop"]["value"] == pytest.approx(0.01)
    assert not any(t["met"] for t in targets.values())
    # an int8 model better than its fp32 student is a negative drop: met
    better = compression_targets(1, 1, STUDENT_LATENCY, made_up_latency(1, 1), 0.9, 0.95)
    assert better["f1_macro_drop"]["met"] is True
