"""Where a benchmark ran: recorded next to every number it produces."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Smoke runs (tests/test_benchmarks.py) write their result files elsewhere, never over these.
RESULTS_ENV = "VISIONPIPE_BENCHMARK_RESULTS"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": _commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def results_dir() -> Path:
    """``benchmarks/results``, or ``$VISIONPIPE_BENCHMARK_RESULTS`` when that is set."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def result_name(name: str, smoke: bool) -> str:
    """A ``--smoke`` run's result is ``<name>_smoke.json``: it never replaces a measurement."""
    return name.replace(".json", "_smoke.json") if smoke else name


def write_result(name: str, payload: dict[str, Any]) -> Path:
    directory = results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
