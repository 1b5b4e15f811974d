"""Evaluation timing: one runtime, several interleaved, the fastest reported; no speed asserted."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tasks.evaluation.latency import (
    BATCH,
    b64_repeats,
    fastest,
    latency_metrics,
    measure_latency,
    measure_runtimes,
    tile_batch,
)
from tasks.evaluation.results import ORT_FP32, TORCH_EAGER
from tests.evaluations import LATENCY_KEYS, made_up_latency


def test_latency_on_a_trivial_function() -> None:
    latency = measure_latency(lambda x: x.sum(), np.ones((4, 1, 8, 8)), warmup=2, repeats=25)
    assert set(latency) == {"median_ms", "p95_ms"}
    assert 0 < latency["median_ms"] <= latency["p95_ms"]


def test_latency_is_per_image() -> None:
    def five_ms(batch: np.ndarray) -> None:
        time.sleep(0.005)

    latency = measure_latency(five_ms, np.ones((10, 1)), warmup=0, repeats=3)
    # 5 ms for a batch of 10 is at least 0.5 ms per image; far below the 5 ms per call.
    assert 0.5 <= latency["median_ms"] < 2.5


def test_latency_with_one_repeat() -> None:
    latency = measure_latency(lambda x: x, np.ones((1, 1)), warmup=0, repeats=1)
    assert latency["median_ms"] == latency["p95_ms"] > 0


def test_latency_p95_never_exceeds_the_slowest_call() -> None:
    durations = iter([0.010, 0.020, 0.030, 0.040, 0.050])

    def slower_each_call(batch: np.ndarray) -> None:
        time.sleep(next(durations))

    latency = measure_latency(slower_each_call, np.ones((1, 1)), warmup=0, repeats=5)
    # The slowest call took 50 ms plus scheduling overshoot; 'exclusive' gives ~57 ms.
    assert latency["p95_ms"] <= 53.0


def test_measure_runtimes_interleaves_and_counts_calls() -> None:
    calls: list[tuple[str, int]] = []

    def recorder(name: str):
        return lambda batch: calls.append((name, len(batch)))

    batch = tile_batch(np.ones((3, 1, 4, 4), np.float32))
    runtimes = {name: (recorder(name), batch) for name in ("a", "b")}
    latency = measure_runtimes(runtimes, warmup=2, repeats=20)
    assert set(latency) == {"a", "b"}
    for name in ("a", "b"):
        assert set(latency[name].as_dict()) == LATENCY_KEYS
        assert calls.count((name, 1)) == 2 + 20  # warm-up, then the repeats
        assert calls.count((name, BATCH)) == 2 + b64_repeats(20)
        assert latency[name].throughput_ips_b64 == pytest.approx(
            BATCH * 1000.0 / latency[name].latency_ms_b64
        )
    # all warm-up first, then timed rounds in which both runtimes take turns
    timed = [name for name, _ in calls[8:]]
    assert timed[0] == "a" and "b" in timed[: len(timed) // 2] and timed[-1] == "b"


def test_batch_64_takes_fewer_repeats_but_never_fewer_than_ten() -> None:
    assert b64_repeats(200) == 20
    assert b64_repeats(5) == b64_repeats(1) == 10


def test_tile_batch_repeats_real_images_up_to_64() -> None:
    images = np.arange(5)[:, None, None, None] * np.ones((1, 1, 2, 2))
    batch = tile_batch(images)
    assert batch.shape == (BATCH, 1, 2, 2)
    assert batch[:, 0, 0, 0].tolist() == [i % 5 for i in range(BATCH)]
    assert tile_batch(np.ones((100, 1, 2, 2))).shape == (BATCH, 1, 2, 2)
    with pytest.raises(ValueError, match="no images"):
        tile_batch(np.ones((0, 1, 2, 2)))


def test_fastest_runtime_is_the_lower_batch_64_latency() -> None:
    # eager wins at batch 1, ONNX Runtime at batch 64: batch 64 decides
    by_runtime = {TORCH_EAGER: made_up_latency(0.10, 9.0), ORT_FP32: made_up_latency(0.20, 3.0)}
    assert fastest(by_runtime) == ORT_FP32
    assert fastest(by_runtime, batch=1) == TORCH_EAGER  # the student budget's single-image view
    assert (
        fastest({ORT_FP32: made_up_latency(1.0, 5.0), TORCH_EAGER: made_up_latency(1.0, 4.0)})
        == TORCH_EAGER
    )
    with pytest.raises(ValueError):
        fastest({})


def test_latency_metrics_report_the_fastest_runtime_and_keep_all() -> None:
    by_runtime = {TORCH_EAGER: made_up_latency(0.10, 9.0), ORT_FP32: made_up_latency(0.20, 3.0)}
    metrics = latency_metrics(by_runtime)
    assert metrics["runtime"] == ORT_FP32
    assert metrics["latency_ms_b64"] == 3.0 and metrics["latency_ms_b1"] == 0.20
    assert metrics["throughput_ips_b64"] == pytest.approx(64e3 / 3.0)
    assert metrics["p95_ms_b1"] == pytest.approx(0.30)
    assert metrics["latency_by_runtime"] == {
        TORCH_EAGER: by_runtime[TORCH_EAGER].as_dict(),
        ORT_FP32: by_runtime[ORT_FP32].as_dict(),
    }
