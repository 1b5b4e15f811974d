"""Resumable training: ``TrainState``, the whole state of a fit, which is also what is saved.

``engine.fit`` keeps everything that decides what comes next in one
``TrainState``: model, optimizer, scheduler, grad scaler, the epoch, the
early-stopping bookkeeping (best weights, best key, patience count), the
history, and every random number generator (python, numpy, torch CPU and
CUDA, the DataLoader's generator, the augmentation pipelines). After every
epoch it is written whole and atomically to ``$VISIONPIPE_HOME/resume/<stage>.pt``
(default ``.visionpipe/resume/``; outside ``models/`` on purpose: DVC deletes
a stage's outputs before it runs it again). When the stage is re-run after
its process was killed, ``fit`` restores it and picks up after the last
finished epoch, and says so. With ``num_workers: 0`` (the default) the resumed
run is bit-for-bit the run that would have happened; with DataLoader workers,
whose augmentation streams live in the killed processes, it is the same
schedule with fresh augmentation draws.

Under ``torchrun`` every rank restores the same state: rank 0 gathers each
rank's generators into the file it writes, and on resume reads the file and
broadcasts it, so all ranks continue from the same epoch with the same
weights and each with its own random streams (no shared filesystem needed).

The state is only reused for the same run: a ``fingerprint`` of the params,
seed and data, and the number of processes, must match, otherwise training
starts over (and says why). The file is removed once the fit completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_f1_macro: float
    lr: float
    seconds: float
    images_per_second: float


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (also of a compiled or DDP-wrapped model's)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}


@dataclass
class TrainState:
    """Everything a fit needs to continue where it stopped; ``payload`` is the resume file.

    ``generator`` is the train loader's (its shuffling, or the device batches'
    augmentation draws); ``augment`` the albumentations pipelines, if any.
    ``epoch`` is the last finished one (0 before the first).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator | None = None
    augment: Any | None = None
    epoch: int = 0
    seconds: float = 0.0
    best_key: tuple[float, float] = (-1.0, float("-inf"))  # (val macro-F1, -val loss)
    best_weights: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_loss: float = float("inf")
    stale: int = 0  # epochs since the best one (patience)
    stopped: bool = False
    history: list[EpochRecord] = field(default_factory=list)
    ema: Any | None = None  # an AveragedModel of ``model``: then it is what is judged and kept

    def finish_epoch(self, record: EpochRecord, counts_for_patience: bool, patience: int,
                     may_stop: bool, keep_last: bool = False) -> None:  # fmt: skip
        """Book ``record``: a new best keeps its weights, else patience runs down.

        With ``keep_last`` every epoch is kept in turn and patience never runs out:
        the fit ends with the schedule and returns its last epoch.
        """
        self.epoch = record.epoch
        self.history.append(record)
        key = (record.val_f1_macro, -record.val_loss)
        if keep_last or key > self.best_key:
            kept = self.model if self.ema is None else self.ema
            self.best_key, self.best_weights = key, weights_of(kept)
            self.best_epoch, self.best_loss, self.stale = record.epoch, record.val_loss, 0
        elif counts_for_patience:
            self.stale += 1
            self.stopped = self.stale >= patience and may_stop

    def payload(self) -> dict[str, Any]:
        """The state as plain tensors, lists and numbers, with every rank's generators.

        A collective under torchrun: every rank must call it, in step.
        """
        return {
            "epoch": self.epoch, "seconds": self.seconds,
            "model": weights_of(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": _gather(capture_rng(self.generator, self.augment)),
            "best_key": list(self.best_key), "best_weights": self.best_weights,
            "best_epoch": self.best_epoch, "best_loss": self.best_loss, "stale": self.stale,
            "stopped": self.stopped, "history": [asdict(r) for r in self.history],
            "ema": None if self.ema is None else self.ema.state_dict(),
        }  # fmt: skip

    def restore(self, payload: dict[str, Any]) -> None:
        """Load ``payload`` (from ``payload()``) into this state; this rank takes its own RNG."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        restore_rng(payload["rng"][_rank()], self.generator, self.augment)
        self.epoch, self.seconds = payload["epoch"], payload["seconds"]
        self.best_key = tuple(payload["best_key"])
        self.best_weights, self.best_epoch = payload["best_weights"], payload["best_epoch"]
        self.best_loss, self.stale = payload["best_loss"], payload["stale"]
        self.stopped = payload["stopped"]
        self.history = [EpochRecord(**record) for record in payload["history"]]
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"])


def capture_rng(generator: torch.Generator | None, augment: Any | None) -> dict[str, Any]:
    """Every generator of this process whose next draw decides the rest of training."""
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(rng: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's generators, in rank order (on every rank; one process: just its own)."""
    if not dist.is_initialized():
        return [rng]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rng)
    return gathered


def save_state(resume: Resume, state: TrainState | dict[str, Any]) -> None:
    """Write ``state`` atomically: a kill mid-write leaves the previous epoch's file intact.

    Given a ``TrainState`` this is a collective: every rank calls it, rank 0 writes.
    """
    payload = state.payload() if isinstance(state, TrainState) else state
    if _rank() > 0:
        return
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(resume.path) as tmp:
        torch.save({**payload, "fingerprint": resume.fingerprint, "world": _world_size()}, tmp)


def load_state(resume: Resume) -> tuple[dict[str, Any] | None, str]:
    """The saved state of this run, or None and the reason it cannot be used.

    Under torchrun a collective: rank 0 reads the file and every rank gets its answer.
    """
    answer: list[Any] = [_read(resume) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def _read(resume: Resume) -> tuple[dict[str, Any] | None, str]:
    if not resume.path.is_file():
        return None, "no saved state"
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start over, never crash on it
        return None, f"unreadable saved state ({type(exc).__name__}: {exc})"
    if state.get("fingerprint") != resume.fingerprint:
        return None, "saved state belongs to other params or data"
    saved_by, now = state.get("world", 1), _world_size()
    if saved_by != now:
        return None, f"saved state was written by {saved_by} processes, not {now}"
    return state, ""


def discard(resume: Resume | None) -> None:
    if resume is not None and _rank() == 0:
        resume.path.unlink(missing_ok=True)
