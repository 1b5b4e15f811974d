"""Tiny params for end-to-end runs: every stage runs for real, in seconds on 2 cores."""

from __future__ import annotations

from pathlib import Path

import yaml

# Budgets this small learn little, so the baseline guard warns instead of failing
# (allow_weak); tests/test_flows.py checks that it fails a stage otherwise.
TINY = {
    "data": {"image_size": 8, "max_per_class": 40},  # 400 of the 1,797 digits
    "augment": {"affine_p": 0.5},
    "train": {
        "width": 8,
        "input_size": 32,
        "epochs": 2,
        "patience": 2,
        "min_steps": 0,
        "allow_weak": True,
    },
    "distill": {"width": 4, "epochs": 3, "patience": 2, "min_steps": 0, "allow_weak": True},
    "quantize": {"calibration_size": 64},
    "evaluate": {"latency_warmup": 1, "latency_repeats": 5},
}


def set_params(repo: Path, overrides: dict) -> None:
    """Update sections of ``repo``'s params.yaml in place (other keys kept)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
