"""A tiny CNN trained in seconds on data whose class sits in one corner.

Used by the explanation tests, and, exported as the pipeline exports its
models, by the predict and registry tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.checkpoints import Checkpoint, save_checkpoint
from tasks.data.images import ImageSpec
from tasks.data.pixels import ChannelStats, normalise
from tasks.export.onnx_io import (
    export_onnx,
    model_metadata,
)
from tasks.export.quantize import (
    quantize_onnx,
)
from tasks.models import build_model
from tasks.params import QuantizeParams


def corner_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise; class 1 has a bright 5x5 patch in the top-left corner, class 0 does not."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 16, 16, generator=generator) * 0.5
    labels = torch.arange(n) % 2
    images[labels == 1, :, :5, :5] += 3.0
    return images, labels


def trained_corner_model(steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", 1, 2, 8, 0.0)
    images, labels = corner_data(256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


CORNER_CLASSES = ("blank", "corner")  # class 1 has a bright top-left corner
CORNER_SPEC = ImageSpec(16, 1, "stretch", 255, 1)
# corner_data is already standardised: pixel = (x * std + mean) * 255 maps it to uint8.
CORNER_STATS = ChannelStats(mean=(0.5,), std=(1 / 6,))


def corner_pixels(n: int, seed: int) -> np.ndarray:
    """corner_data as uint8 (n, 16, 16): what a camera would have stored."""
    images, _ = corner_data(n, seed)
    scaled = (images[:, 0].numpy() * CORNER_STATS.std[0] + CORNER_STATS.mean[0]) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def corner_checkpoint(model: torch.nn.Module) -> Checkpoint:
    """``model`` (from trained_corner_model) as the pipeline would save it."""
    return Checkpoint(
        model_name="cnn",
        width=8,
        dropout=0.0,
        in_channels=1,
        image_size=16,
        classes=CORNER_CLASSES,
        stats=CORNER_STATS,
        params={"seed": 0},
        metrics={},
        state_dict=model.state_dict(),
        preprocessing=CORNER_SPEC.preprocessing(),
    )


def export_corner_variants(directory: Path, quantize: QuantizeParams) -> tuple[Path, Path, Path]:
    """A trained corner model as the three files the pipeline ships: .pt, fp32 and int8 ONNX."""
    model = trained_corner_model(steps=30)
    checkpoint = corner_checkpoint(model)
    pt = save_checkpoint(directory / "student.pt", checkpoint)
    fp32 = export_onnx(model, (1, 16, 16), directory / "student.onnx", model_metadata(checkpoint))
    calibration = normalise(corner_pixels(64, seed=2)[..., None], CORNER_STATS)
    int8 = quantize_onnx.fn(fp32, directory / "student_int8.onnx", calibration, quantize)
    return pt, fp32, int8


RANDOM_CLASSES = ("a", "b", "c")


def random_checkpoint() -> Checkpoint:
    """A random cnn with realistic (not init-time) BatchNorm statistics and head scale."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, len(RANDOM_CLASSES), width=4, dropout=0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.5)
    return Checkpoint(
        model_name="cnn",
        width=4,
        dropout=0.0,
        in_channels=1,
        image_size=8,
        classes=RANDOM_CLASSES,
        stats=ChannelStats(mean=(0.4,), std=(0.3,)),
        params={"seed": 0, "distill.width": 4},
        metrics={"val_f1_macro": 0.5},
        state_dict=model.state_dict(),
        mlflow_run_id="run-123",
    )
