"""Quantization-aware training in plain PyTorch: BN folding, fake-quantized weights, activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.export.qat import ActivationFakeQuant, fake_quant_weight, fold_batchnorm
from tasks.models import build_model
from tests.toymodels import random_checkpoint


def test_fold_batchnorm_keeps_the_function_and_removes_every_bn() -> None:
    model = random_checkpoint().build()
    folded = fold_batchnorm(model)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy was folded
    resnet = build_model("resnet", 1, 3, 4, 0.0).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fold_batchnorm(resnet).modules())


def test_fake_quant_weight_rounds_onto_a_per_channel_int8_grid() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.26], [0.01, 0.02, -0.02]])
    rounded = fake_quant_weight(weight)
    steps = rounded / (weight.abs().amax(dim=1, keepdim=True) / 127.5)
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert (rounded - weight).abs().max() <= 1.0 / 127.5 / 2 + 1e-6


def test_activation_fake_quant_tracks_the_range_and_passes_gradients() -> None:
    quant = ActivationFakeQuant()
    x = torch.linspace(-1.0, 3.0, 101, requires_grad=True)
    y = quant(x)
    assert quant.low.item() == pytest.approx(-1.0) and quant.high.item() == pytest.approx(3.0)
    assert (y - x).abs().max().item() <= 4.0 / 255 / 2 + 1e-6
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through inside the range
