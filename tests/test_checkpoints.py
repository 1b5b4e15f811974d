"""Self-describing checkpoints: saved, loaded and rebuilt into the same network."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.checkpoints import load_checkpoint, save_checkpoint
from tests.toymodels import random_checkpoint


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    checkpoint = random_checkpoint()
    path = save_checkpoint(tmp_path / "student.pt", checkpoint)
    loaded = load_checkpoint(path)
    for field in ("model_name", "width", "in_channels", "image_size", "classes", "stats"):
        assert getattr(loaded, field) == getattr(checkpoint, field)
    assert (loaded.params, loaded.metrics, loaded.mlflow_run_id) == (
        checkpoint.params,
        checkpoint.metrics,
        checkpoint.mlflow_run_id,
    )
    model = loaded.build()
    assert not model.training
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), checkpoint.build()(images))
