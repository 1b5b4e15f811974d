"""Quantization-aware training (QAT) in plain PyTorch, for ONNX Runtime int8 deployment.

When post-training quantization loses too much (``quantize.method: auto`` and
a val macro-F1 drop above ``quantize.max_drop``), the student is fine-tuned
with int8 rounding simulated in the forward pass, so its weights move to where
rounding hurts least (Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018). The
fine-tuned float weights are then quantized by ONNX Runtime exactly like PTQ.

Why not ``torch.ao.quantization``'s QAT: it is deprecated upstream and its
PT2E successor lives in a separate package (torchao); its converted models
also do not export to ONNX int8. The simulation here needs only
``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` (core
ATen ops, gradients by the straight-through estimator) and mirrors ONNX
Runtime's scheme: int8 symmetric per-output-channel weights, uint8 affine
per-tensor activations at the input of every conv and linear layer. BatchNorm
is folded into the preceding conv first (``fold_batchnorm``), as the ONNX
export does, so the weights that are simulated are the weights that ship.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats
from tasks.training.engine import TrainStep, train_epoch
from tasks.training.hardware import Precision
from tasks.training.loaders import make_loader


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv-BN pair (adjacent in an ``nn.Sequential``)
    folded into one conv with a bias, using the BN's running statistics."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(conv, norm)
                    module[i + 1] = nn.Identity()
    return folded


class ActivationFakeQuant(nn.Module):
    """uint8 affine rounding of a tensor, its range an exponential moving average of
    the batch min/max (the observer), always including zero."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
                if not self.observed:
                    self.low.copy_(low)
                    self.high.copy_(high)
                    self.observed.fill_(True)
                else:
                    self.low.lerp_(low, self.momentum)
                    self.high.lerp_(high, self.momentum)
        scale = ((self.high - self.low) / 255.0).clamp(min=1e-8)
        zero_point = torch.round(-self.low / scale).clamp(0, 255).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 symmetric rounding with one scale per output channel (ORT's QInt8 weights)."""
    flat = weight.detach().abs().flatten(1).amax(dim=1)
    scale = (flat / 127.5).clamp(min=1e-12)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -128, 127)


class FakeQuantLayer(nn.Module):
    """A conv or linear layer whose input and weights are rounded as int8 inference rounds them."""

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.layer = layer
        self.input_quant = ActivationFakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        weight = fake_quant_weight(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        conv = self.layer
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _swap(model: nn.Module, replace) -> nn.Module:
    for name, child in model.named_children():
        swapped = replace(child)
        if swapped is not None:
            setattr(model, name, swapped)
        else:
            _swap(child, replace)
    return model


def prepare_qat(folded: nn.Module, skip_first_conv: bool) -> nn.Module:
    """Wrap every conv and linear layer of a BN-folded model in ``FakeQuantLayer``;
    the first conv stays float when ``skip_first_conv`` (it will not be quantized)."""
    first = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))

    def replace(module: nn.Module) -> nn.Module | None:
        if module is first and skip_first_conv:
            return module
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return FakeQuantLayer(module)
        return None

    return _swap(folded, replace)


def strip_qat(model: nn.Module) -> nn.Module:
    """The float network inside a QAT model: its fine-tuned weights, no simulation."""
    return _swap(model, lambda m: m.layer if isinstance(m, FakeQuantLayer) else None).eval()


def qat_finetune(
    model: nn.Module,
    train: Split,
    stats: ChannelStats,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    skip_first_conv: bool,
) -> nn.Module:
    """Fold BN, simulate int8, fine-tune on the labels; return the float network to quantize.

    A low learning rate on a cosine schedule: the weights should settle into
    the int8 grid, not learn the task again.
    """
    torch.manual_seed(seed)
    qat = prepare_qat(fold_batchnorm(model), skip_first_conv)
    loader = make_loader(train, stats, batch_size, seed=seed, train=True)
    optimizer = torch.optim.AdamW(qat.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    cpu = torch.device("cpu")
    precision = Precision.of("fp32", cpu)
    # The fits' own step: fp32, the batches as they come, no clipping.
    step = TrainStep(
        qat, optimizer, scheduler, precision.scaler(), precision, cpu, torch.preserve_format,
        grad_clip=0.0, hint="lower quantize.qat_lr",
    )  # fmt: skip
    qat.train()
    for epoch in range(1, epochs + 1):
        train_epoch(step, qat, cross_entropy, loader, epoch, epochs)
    return strip_qat(qat)


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """QAT's objective: the labels' cross-entropy on the fake-quantized model's logits."""
    logits = model(images)
    return F.cross_entropy(logits, labels), logits
