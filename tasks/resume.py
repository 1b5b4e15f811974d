"""Resumable training: the whole state of a fit, written atomically after every epoch.

``engine.fit`` saves model, optimizer, scheduler, grad scaler, epoch, early-stop
bookkeeping, history and every random number generator that decides what
comes next (python, numpy, torch CPU and CUDA, the DataLoader's generator, the
augmentation pipelines) to ``$VISIONPIPE_HOME/resume/<stage>.pt`` (default
``.visionpipe/resume/``; outside ``models/`` on purpose: DVC deletes a stage's
outputs before it runs it again). When the stage is re-run after its process
was killed, ``fit`` picks up after the last finished epoch and says so. With
``num_workers: 0`` (the default) the resumed run is bit-for-bit the run that
would have happened; with DataLoader workers, whose augmentation streams live
in the killed processes, it is the same schedule with fresh augmentation draws.

The state is only reused for the same run: a ``fingerprint`` of the params,
seed and data must match, otherwise training starts over (and says why). The
file is removed once the fit completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.artifacts import atomic_path

STATE_DIR_ENV = "VISIONPIPE_HOME"


def resume_path(stage: str) -> Path:
    """Where ``stage`` keeps its in-progress state."""
    return Path(os.environ.get(STATE_DIR_ENV, ".visionpipe")).resolve() / "resume" / f"{stage}.pt"


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable ``parts`` (params, seed, data description)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class Resume:
    """Where to keep a fit's state, and which run it belongs to."""

    path: Path
    fingerprint: str


def capture_rng(generator: torch.Generator | None, augment: Any | None) -> dict[str, Any]:
    """Every generator whose next draw decides the rest of training."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state() if generator is not None else None,
        "augment": augment.get_state() if augment is not None else None,
    }
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None, augment: Any | None):
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])
    if augment is not None and state["augment"] is not None:
        augment.set_state(state["augment"])


def _numpy_state() -> tuple:
    # torch.load(weights_only=True) reads tensors, lists and numbers, not numpy arrays.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), pos, has_gauss, cached)


def _tuples(value: Any) -> Any:
    """Lists back to tuples (random.setstate wants its nested tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_state(resume: Resume, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a kill mid-write leaves the previous epoch's file intact."""
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(resume.path) as tmp:
        torch.save({**state, "fingerprint": resume.fingerprint}, tmp)


def load_state(resume: Resume) -> tuple[dict[str, Any] | None, str]:
    """The saved state of this run, or None and the reason it cannot be used."""
    if not resume.path.is_file():
        return None, "no saved state"
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start over, never crash on it
        return None, f"unreadable saved state ({type(exc).__name__}: {exc})"
    if state.get("fingerprint") != resume.fingerprint:
        return None, "saved state belongs to other params or data"
    return state, ""


def discard(resume: Resume | None) -> None:
    if resume is not None:
        resume.path.unlink(missing_ok=True)
