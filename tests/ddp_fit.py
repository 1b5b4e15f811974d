"""One tiny fit, in one process or under torchrun: ``python -m tests.ddp_fit OUT.json``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.ddp_fit out.json
    python -m torch.distributed.run ... -m tests.ddp_fit out.json STATE.pt KILL_AT [self|agent]

A width-4 cnn on seeded 8x8 images (a bright corner marks class 1), global
batch 16, three epochs, no augmentation or dropout, through ``tasks.training.train``'s
real ``build_loaders`` and ``engine.fit``. Rank 0 writes the per-epoch train
loss, val accuracy and the final weights to OUT.json, and every rank a hash
of its final weights and buffers to OUT.json.rank<r>.

With STATE the fit is resumable (``tasks/training/resume.py``) and every random stream
matters: four epochs with dropout and augmentation (drawn per rank). With
KILL_AT > 0 rank 0 SIGKILLs itself when epoch KILL_AT ends, before that
epoch's state is saved, as a crash would; torchrun then stops the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tasks.data.datasets import PreparedData, Split
from tasks.data.pixels import ChannelStats
from tasks.models import build_model
from tasks.params import load_params
from tasks.training.distributed import World, init_process_group
from tasks.training.engine import fit, supervised_objective
from tasks.training.hardware import seed_everything
from tasks.training.inputs import TrainingData, build_loaders
from tasks.training.resume import Resume

ROOT = Path(__file__).resolve().parents[1]


def main(out: str, state: str = "-", kill_at: int = 0, kill: str = "self") -> None:
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    resume = None if state == "-" else Resume(Path(state), "tiny-ddp-run")
    dropout = 0.0 if resume is None else 0.3
    fit_params = params.train.model_copy(
        update={"epochs": 3 if resume is None else 4, "batch_size": 16, "patience": 10,
                "dropout": dropout, "device": "cpu", "lr": 0.01, "min_steps": 0}
    )  # fmt: skip
    augment = params.augment
    if resume is None:
        augment = augment.model_copy(update={"affine_p": 0.0, "brightness_contrast_p": 0.0})
    rng = np.random.default_rng(0)
    labels = np.arange(128) % 2
    images = rng.integers(0, 200, size=(128, 8, 8, 1), dtype=np.uint8)
    images[labels == 1, :3, :3] = 255
    train, val = Split(images[:96], labels[:96]), Split(images[96:], labels[96:])
    prepared = PreparedData(train, val, val, ("0", "1"), ChannelStats.of(train.images))
    data = TrainingData(prepared, train, np.ones(len(train)))
    world = World.from_env()
    device = init_process_group(world, torch.device("cpu"))
    Path(f"{out}.pid{world.rank}").write_text(str(os.getpid()))
    seed_everything(0, deterministic=True)
    model = build_model("cnn", 1, 2, 4, dropout)
    train_loader, val_loader = build_loaders(data, fit_params, augment, 0, device)
    objective = supervised_objective(torch.nn.CrossEntropyLoss())
    logs: list[str] = []

    def on_epoch(record) -> None:
        if record.epoch == kill_at and world.is_main:
            if kill == "self":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(5)  # the kernel's SIGKILL lands here; an orphan would go on to save

    result = fit(
        model, objective, train_loader, val_loader, fit_params, device, on_epoch,
        resume=resume, log=logs.append,
    )  # fmt: skip
    weights = b"".join(v.numpy().tobytes() for v in result.model.state_dict().values())
    Path(f"{out}.rank{world.rank}").write_text(hashlib.sha256(weights).hexdigest())
    if world.is_main:
        Path(out).write_text(json.dumps({
            "world": world.size,
            "epochs": [r.epoch for r in result.history],
            "logs": logs,
            "batches_per_epoch": len(train_loader),
            "train_loss": [r.train_loss for r in result.history],
            "val_accuracy": [r.val_accuracy for r in result.history],
            "weights": {k: v.flatten().tolist() for k, v in result.model.state_dict().items()
                        if v.is_floating_point()},
        }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *map(int, sys.argv[3:4]), *sys.argv[4:5])
