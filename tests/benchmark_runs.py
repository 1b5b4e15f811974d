"""Running a benchmark script as a user does, for the tests that check its smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.machine import RESULTS_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(
    script: str, *args: str, results: Path, timeout: float
) -> subprocess.CompletedProcess:
    """``python benchmarks/<script>.py ARGS`` in the repository, its results into ``results``,
    one torch thread (the tests run side by side)."""
    env = {**os.environ, RESULTS_ENV: str(results), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
