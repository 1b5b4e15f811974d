"""Tiny params for end-to-end runs: every stage runs for real, in seconds on 2 cores."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY = {
    "data": {"image_size": 8},
    "augment": {"affine_p": 0.5},
    "train": {"width": 8, "epochs": 3, "patience": 2},
    "distill": {"width": 4, "epochs": 3, "patience": 2},
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
