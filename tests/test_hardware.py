"""Device choice and autocast precision, on the CPU (CUDA-only checks carry the gpu marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.training.hardware import Precision, select_device
from tasks.training.inputs import TrainingData
from tasks.training.train import fit_teacher

CPU = torch.device("cpu")


def test_select_device() -> None:
    assert select_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected


def test_asking_for_an_absent_cuda_device_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu_too(params, tiny_prepared, precision: str) -> None:
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    fit_params = params.train.model_copy(
        update={"model": "cnn", "pretrained": False, "width": 4, "epochs": 2, "batch_size": 8,
                "device": "cpu", "precision": precision, "min_steps": 0}
    )  # fmt: skip
    result = fit_teacher.fn(data, fit_params, params.augment, seed=0)
    assert all(np.isfinite(r.train_loss) and np.isfinite(r.val_loss) for r in result.history)
    # autocast changes the arithmetic, never the stored weights
    assert all(
        v.dtype == torch.float32
        for v in result.model.state_dict().values()
        if v.is_floating_point()
    )


def test_precision_names_the_valid_choices() -> None:
    assert Precision.of("bf16", CPU).dtype == torch.bfloat16
    assert Precision.of("fp32", CPU).scaler().is_enabled() is False
    with pytest.raises(ValueError, match="valid choices: fp32, bf16, fp16"):
        Precision.of("fp8", CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_fit_on_cuda_in_every_precision(params, tiny_prepared, precision: str) -> None:
    data = TrainingData(tiny_prepared, tiny_prepared.train, np.ones(len(tiny_prepared.train)))
    for on_device in (False, True):  # DataLoader batches, then batches held on the GPU
        fit_params = params.train.model_copy(
            update={"model": "cnn", "pretrained": False, "width": 8, "epochs": 3, "batch_size": 8,
                    "device": "cuda", "precision": precision, "min_steps": 0,
                    "data_on_device": on_device}
        )  # fmt: skip
        result = fit_teacher.fn(data, fit_params, params.augment, seed=0)
        assert next(result.model.parameters()).device.type == "cuda"
        assert all(np.isfinite(r.train_loss) for r in result.history)
        assert result.best_val_f1_macro > 0.2  # ten brightness classes: above chance (0.1)


@pytest.mark.gpu
def test_fp16_scales_the_loss_and_bf16_does_not() -> None:
    cuda = torch.device("cuda")
    assert Precision.of("fp16", cuda).scaler().is_enabled() is True
    assert Precision.of("bf16", cuda).scaler().is_enabled() is False
    with Precision.of("bf16", cuda).autocast():
        product = torch.ones(4, 4, device=cuda) @ torch.ones(4, 4, device=cuda)
    assert product.dtype == torch.bfloat16
