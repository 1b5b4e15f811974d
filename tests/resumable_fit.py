"""A tiny fit that can be killed mid-run: ``python -m tests.resumable_fit STATE KILL_AT``.

Trains a width-4 cnn on seeded 8x8 noise for four epochs with augmentation
and dropout (so every random stream matters) and an EMA of the weights (so its
state must resume too), saving its state to STATE
after each epoch (STATE ``-``: no resume state). With KILL_AT > 0 the process
SIGKILLs itself when epoch KILL_AT ends, before that epoch's state is saved,
as a crash would. Prints one JSON line: the epochs in the history, a hash
of the final weights, and the log lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats
from tasks.models import build_model
from tasks.params import load_params
from tasks.training.engine import fit
from tasks.training.hardware import seed_everything
from tasks.training.loaders import make_loader
from tasks.training.resume import Resume
from tasks.training.transforms import build_augment

ROOT = Path(__file__).resolve().parents[1]


def main(state: str, kill_at: int) -> None:
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    fit_params = params.train.model_copy(
        update={
            "epochs": 4,
            "batch_size": 8,
            "patience": 10,
            "dropout": 0.3,
            "device": "cpu",
            "min_steps": 0,
            "ema_half_life": 1.0,
        }
    )
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 3
    images = rng.integers(0, 255, size=(48, 8, 8, 1), dtype=np.uint8)
    images[labels == 1, :4, :4] = 255
    train, val = Split(images[:36], labels[:36]), Split(images[36:], labels[36:])
    stats = ChannelStats.of(train.images)
    seed_everything(0, deterministic=True)
    model = build_model("cnn", 1, 3, 4, 0.3)
    augment = build_augment(params.augment, seed=0, channels=1, size=8)
    loader = make_loader(train, stats, 8, seed=0, train=True, augment=augment)
    val_loader = make_loader(val, stats, 8, seed=0)
    logs: list[str] = []

    def on_epoch(record) -> None:
        if record.epoch == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    from tasks.training.engine import supervised_objective

    resume = None if state == "-" else Resume(Path(state), "tiny-run")
    result = fit(
        model, supervised_objective(torch.nn.CrossEntropyLoss()), loader, val_loader,
        fit_params, torch.device("cpu"), on_epoch, resume=resume, log=logs.append,
    )  # fmt: skip
    weights = b"".join(v.numpy().tobytes() for v in result.model.state_dict().values())
    print(json.dumps({
        "epochs": [r.epoch for r in result.history],
        "train_loss": [r.train_loss for r in result.history],
        "weights": hashlib.sha256(weights).hexdigest(),
        "logs": logs,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
