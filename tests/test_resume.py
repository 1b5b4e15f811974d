"""Fault tolerance: a killed fit resumes from its last epoch and ends where it would have."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.params import load_params
from tasks.training.resume import (
    Resume,
    capture_rng,
    fingerprint,
    load_state,
    restore_rng,
    save_state,
)
from tasks.training.transforms import build_augment

ROOT = Path(__file__).resolve().parents[1]


def _run(state: str, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tests.resumable_fit", state, str(kill_at)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.integration
def test_a_killed_fit_resumes_and_finishes_as_if_never_interrupted(tmp_path: Path) -> None:
    state = tmp_path / "resume" / "train.pt"
    killed = _run(str(state), kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved, _ = load_state(Resume(state, "tiny-run"))
    assert saved is not None and saved["epoch"] == 2  # epoch 3 died before its state was saved

    resumed = _run(str(state), kill_at=0)
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout.splitlines()[-1])
    assert out["epochs"] == [1, 2, 3, 4]  # same number of total epochs, none repeated
    assert any("epoch 2 of 4 was finished, continuing at epoch 3" in line for line in out["logs"])
    assert not state.exists()  # a completed fit leaves no state behind

    uninterrupted = json.loads(_run("-", kill_at=0).stdout.splitlines()[-1])
    assert out["train_loss"] == uninterrupted["train_loss"]
    assert out["weights"] == uninterrupted["weights"]  # bit for bit (num_workers 0)


def test_state_of_another_run_or_a_broken_file_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    save_state(Resume(path, fingerprint({"train.lr": 0.1})), {"epoch": 3})
    state, why = load_state(Resume(path, fingerprint({"train.lr": 0.2})))
    assert state is None and "other params or data" in why
    assert load_state(Resume(path, fingerprint({"train.lr": 0.1})))[0]["epoch"] == 3
    path.write_bytes(b"half a file")
    state, why = load_state(Resume(path, "x"))
    assert state is None and "unreadable" in why
    assert load_state(Resume(tmp_path / "none.pt", "x")) == (None, "no saved state")


def test_every_random_stream_is_captured_and_restored(tmp_path: Path) -> None:
    augment = build_augment(load_params(ROOT / "params.yaml").augment, seed=0, channels=1, size=8)
    generator = torch.Generator().manual_seed(0)
    image = np.full((8, 8, 1), 128, dtype=np.uint8)

    def draw() -> list:
        return [
            random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, generator=generator).item(), augment(image, 0).tobytes(),
        ]  # fmt: skip

    path = tmp_path / "rng.pt"
    save_state(Resume(path, "r"), {"rng": capture_rng(generator, augment)})
    first = draw()
    restore_rng(load_state(Resume(path, "r"))[0]["rng"], generator, augment)
    assert draw() == first
