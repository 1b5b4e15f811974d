"""What ``metrics/evaluate.json`` holds, by name: its variants, the steps between them, its keys.

One object per variant (``VARIANTS``); ``baselines``, what learning nothing
scores on the same test split; ``runtime_versions``, the library versions the
runtimes were timed with. Runtime keys (``torch-eager``, ``onnxruntime-fp32``,
``onnxruntime-int8``) carry no version, so ``dvc metrics diff`` compares runs
across upgrades; the versions are recorded once, beside them. Light on purpose:
``visionpipe compare`` reads an evaluate.json with nothing heavier than this.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

VARIANTS = ("teacher", "student", "student_int8")
TORCH_EAGER = "torch-eager"
ORT_FP32 = "onnxruntime-fp32"
ORT_INT8 = "onnxruntime-int8"
RUNTIME_VERSIONS = "runtime_versions"  # evaluate.json's key for the libraries behind them


def runtime_versions() -> dict[str, str]:
    """The installed torch and onnxruntime, read from their metadata (no import needed)."""
    return {name: version(name).split("+")[0] for name in ("torch", "onnxruntime")}


# Each compression step, as (reference, candidate): what it costs is candidate - reference.
STEPS = (("teacher", "student"), ("student", "student_int8"))
BASELINES = "baselines"  # what learning nothing scores, beside the variants


def variant_results(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The variants of an evaluate.json, without its ``baselines`` and ``runtime_versions``."""
    return {name: m for name, m in results.items() if name not in (BASELINES, RUNTIME_VERSIONS)}
