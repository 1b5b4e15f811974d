"""Latency of one network in each runtime it can ship in, measured side by side.

Pure timing and selection, no model code: ``tasks/evaluation/evaluate.py`` hands in one
``predict`` per (variant, runtime) and real test images; this module warms
every runtime up, then times them interleaved in rounds, so that a noisy
shared machine slows all of them alike, and picks each variant's fastest
runtime. Numbers per runtime:

- ``latency_ms_b1``, ``p95_ms_b1``: median and 95th percentile ms per call of one image;
- ``latency_ms_b64``: median ms per call of a batch of ``BATCH`` images;
- ``throughput_ips_b64``: images per second at that batch, ``BATCH / (latency_ms_b64 / 1000)``.

The thread count is the caller's: it fixes it in every runtime before calling.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal, TypeVar

import numpy as np

Predict = Callable[[np.ndarray], object]  # normalised NCHW float32 batch -> anything
BATCH = 64
ROUNDS = 5  # interleaving rounds: each runtime is timed in every one of them
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Latency:
    latency_ms_b1: float
    p95_ms_b1: float
    latency_ms_b64: float
    throughput_ips_b64: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def p95(times: list[float]) -> float:
    """95th percentile; "inclusive" interpolates between measured times, the default
    extrapolates past the slowest one."""
    return statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 1 else times[0]


def call_times_ms(predict: Predict, sample: np.ndarray, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``predict(sample)``, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(sample)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure_latency(predict: Predict, sample: np.ndarray, warmup: int, repeats: int) -> dict:
    """Median and p95 wall time of ``predict(sample)``, in ms per image, after warm-up.

    One runtime on its own; ``measure_runtimes`` compares several fairly.
    """
    call_times_ms(predict, sample, warmup)
    times = [t / len(sample) for t in call_times_ms(predict, sample, repeats)]
    return {"median_ms": statistics.median(times), "p95_ms": p95(times)}


def tile_batch(images: np.ndarray, size: int = BATCH) -> np.ndarray:
    """``size`` images from the front of ``images``, repeated when there are fewer."""
    if len(images) == 0:
        raise ValueError("no images to time the model on")
    return np.ascontiguousarray(images[np.arange(size) % len(images)])


def b64_repeats(repeats: int) -> int:
    # A batch-64 call does ~64x the work of a batch-1 call, so the batch-1 count would
    # dominate the stage's run time; and a call that long averages the scheduler's jitter
    # over its 64 images, so fewer calls already give a stable median.
    return max(10, repeats // 10)


def _split(total: int, rounds: int) -> list[int]:
    """``total`` calls spread over ``rounds`` rounds as evenly as possible."""
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


def measure_runtimes(
    runtimes: Mapping[K, tuple[Predict, np.ndarray]], warmup: int, repeats: int
) -> dict[K, Latency]:
    """Latency of every runtime, each given as ``(predict, batch of BATCH images)``.

    All runtimes are warmed up first (at both batch sizes: a runtime may plan
    memory per input shape), then timed in ``ROUNDS`` interleaved rounds;
    median and p95 are over every call of every round.
    """
    for predict, batch in runtimes.values():
        call_times_ms(predict, batch[:1], warmup)
        call_times_ms(predict, batch, warmup)
    rounds = min(ROUNDS, repeats)
    b1 = {key: [] for key in runtimes}
    b64 = {key: [] for key in runtimes}
    for n1, n64 in zip(_split(repeats, rounds), _split(b64_repeats(repeats), rounds), strict=True):
        for key, (predict, batch) in runtimes.items():
            b1[key] += call_times_ms(predict, batch[:1], n1)
            b64[key] += call_times_ms(predict, batch, n64)
    results = {}
    for key, (_, batch) in runtimes.items():
        median_b64 = statistics.median(b64[key])
        results[key] = Latency(
            latency_ms_b1=statistics.median(b1[key]),
            p95_ms_b1=p95(b1[key]),
            latency_ms_b64=median_b64,
            throughput_ips_b64=len(batch) * 1000.0 / median_b64,
        )
    return results


def fastest(by_runtime: Mapping[str, Latency], batch: Literal[1, 64] = 64) -> str:
    """The runtime with the lowest median latency at ``batch`` (the first one on a tie)."""
    if not by_runtime:
        raise ValueError("no runtimes measured")
    if batch == 1:
        return min(by_runtime, key=lambda name: by_runtime[name].latency_ms_b1)
    return min(by_runtime, key=lambda name: by_runtime[name].latency_ms_b64)


def latency_metrics(by_runtime: Mapping[str, Latency]) -> dict[str, object]:
    """A variant's latency entries: its fastest runtime's numbers on top, every runtime below."""
    best = fastest(by_runtime)
    return {
        **by_runtime[best].as_dict(),
        "runtime": best,
        "latency_by_runtime": {name: latency.as_dict() for name, latency in by_runtime.items()},
    }
