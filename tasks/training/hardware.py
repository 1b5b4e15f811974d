"""Where and how exactly a fit runs: seeding and determinism, the device, autocast precision.

``seed_everything`` seeds python, numpy and torch in one place (DataLoader
workers and albumentations are seeded from the same seed by ``loaders.py``);
``select_device`` resolves ``device: auto``; ``Precision`` is autocast and
gradient scaling for ``precision: fp32 | bf16 | fp16``. Used by ``engine.fit``
and the train and distill stages.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; make kernels deterministic if asked.

    DataLoader workers and albumentations are seeded from the same seed by
    ``make_loader`` (through its generator and ``_seed_worker``).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (CUDA docs).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def select_device(name: str) -> torch.device:
    """``auto``: CUDA, else Apple's MPS, else the CPU; asking for an absent one is an error."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not mps:
        raise RuntimeError("device: mps was asked for but torch sees no MPS device")
    return torch.device(name)


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Autocast and gradient scaling for ``train.precision`` on ``device``.

    bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does
    (a ``GradScaler`` skips steps whose gradients overflowed and adapts the scale).
    """

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def of(cls, name: str, device: torch.device) -> Precision:
        if name not in AMP_DTYPES:
            raise ValueError(f"precision: unknown {name!r}; valid choices: {', '.join(AMP_DTYPES)}")
        return cls(device.type, AMP_DTYPES[name])

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)
