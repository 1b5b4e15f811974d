"""The networks, in plain PyTorch (torchvision's CPU build does not install beside torch here).

``build_model(name, ...)`` picks one from ``MODELS`` (small networks trained
from scratch: ``resnet``, ``cnn`` and the depthwise-separable ``mobilenet``)
or ``PRETRAINED`` (with ImageNet weights: ``efficientnet_lite0``, the default
teacher, and ``efficientnet_lite0_trunk``, its first blocks, the default
student). All end in global average pooling, so any ``data.image_size``
works without changing the head.

``width`` is the first stage's channel count and ``width_multiplier`` scales
every layer (MobileNet's alpha): the knob that trades accuracy for size
without changing the architecture's shape. ``trunk_blocks`` is the trunk
student's depth: how many of Lite0's 16 MBConv blocks it keeps.

Every conv is followed by BatchNorm inside one ``nn.Sequential`` (conv, BN,
ReLU): the pattern ``tasks/export/quantize.py`` folds before quantizing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tasks.data.pixels import ChannelStats
from tasks.efficientnet import HEAD_CHANNELS, TRUNK_BLOCKS, features_channels, lite0_features


def conv_bn_relu(
    cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1
) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def scaled(channels: int, multiplier: float) -> int:
    """``channels * multiplier``, rounded, at least one."""
    return max(1, round(channels * multiplier))


def depthwise_separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """A 3x3 depthwise conv (one filter per channel) then a 1x1 pointwise conv, each BN-ReLU.

    Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
    Mobile Vision Applications", 2017: about ``1/cout + 1/9`` of a full 3x3
    conv's multiply-adds and weights.
    """
    return nn.Sequential(
        conv_bn_relu(cin, cin, stride, groups=cin),
        conv_bn_relu(cin, cout, kernel=1),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) skip.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


class Classifier(nn.Module):
    """features -> global average pool -> dropout -> linear."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def resnet(in_channels: int, num_classes: int, width: int, dropout: float) -> Classifier:
    """A small ResNet: stem, then three residual stages at width, 2x and 4x (stride 2 each)."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 4 * width, stride=2),
    )
    return Classifier(features, 4 * width, num_classes, dropout)


def cnn(in_channels: int, num_classes: int, width: int, dropout: float) -> Classifier:
    """A plain conv-BN-ReLU stack (width, 2x, 4x; two stride-2 steps): the default student."""
    features = nn.Sequential(
        conv_bn_relu(in_channels, width),
        conv_bn_relu(width, 2 * width, stride=2),
        conv_bn_relu(2 * width, 4 * width, stride=2),
    )
    return Classifier(features, 4 * width, num_classes, dropout)


def mobilenet(in_channels: int, num_classes: int, width: int, dropout: float) -> Classifier:
    """MobileNet-style: a full 3x3 stem, then depthwise-separable blocks to 8x width.

    Two stride-2 steps (not MobileNet's five) because inputs here are 16-32 px.
    """
    features = nn.Sequential(
        conv_bn_relu(in_channels, width),
        depthwise_separable(width, 2 * width, stride=2),
        depthwise_separable(2 * width, 2 * width),
        depthwise_separable(2 * width, 4 * width, stride=2),
        depthwise_separable(4 * width, 4 * width),
        depthwise_separable(4 * width, 8 * width),
    )
    return Classifier(features, 8 * width, num_classes, dropout)


MODELS: dict[str, Callable[[int, int, int, float], Classifier]] = {
    "resnet": resnet,
    "cnn": cnn,
    "mobilenet": mobilenet,
}


def efficientnet_lite0(
    in_channels: int,
    num_classes: int,
    dropout: float,
    view: InputView,
    trunk_blocks: int = TRUNK_BLOCKS,
) -> Classifier:
    """EfficientNet-Lite0 (``tasks/efficientnet.py``), seeing ``view.size`` px in 3 channels.

    Its architecture is fixed (the ImageNet weights' shape): ``width``,
    ``width_multiplier`` and ``trunk_blocks`` do not apply. ``in_channels`` 1 is replicated to 3.
    """
    if len(view.stats.mean) != in_channels:
        raise ValueError(f"{len(view.stats.mean)} channel statistics for {in_channels} channels")
    model = Classifier(lite0_features(view.stats, view.size), HEAD_CHANNELS, num_classes, dropout)
    # channels_last weights (PretrainedInput's output is channels_last too): its depthwise
    # convs ran about 5x faster so on this CPU. engine.fit converts every model it trains;
    # this covers the other uses (distill's frozen teacher, evaluate, predict).
    return model.to(memory_format=torch.channels_last)


def efficientnet_lite0_trunk(
    in_channels: int,
    num_classes: int,
    dropout: float,
    view: InputView,
    trunk_blocks: int = TRUNK_BLOCKS,
) -> Classifier:
    """EfficientNet-Lite0's stem and first ``trunk_blocks`` blocks, then a new head (6
    blocks, the default: 88K parameters) that start from ImageNet features. A student
    for data on which small networks from random weights learn nothing (README: the
    student)."""
    if len(view.stats.mean) != in_channels:
        raise ValueError(f"{len(view.stats.mean)} channel statistics for {in_channels} channels")
    features = lite0_features(view.stats, view.size, blocks=trunk_blocks)
    model = Classifier(features, features_channels(features), num_classes, dropout)
    return model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class InputView:
    """What a pretrained network needs to see the project's input its own way: the
    statistics the input was standardised with, and the resolution it runs at."""

    stats: ChannelStats
    size: int


# Networks with ImageNet weights: fixed architectures that take an InputView.
PRETRAINED: dict[str, Callable[[int, int, float, InputView, int], Classifier]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite0_trunk": efficientnet_lite0_trunk,
}


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    width: int,
    dropout: float,
    width_multiplier: float = 1.0,
    view: InputView | None = None,
    trunk_blocks: int = TRUNK_BLOCKS,
) -> Classifier:
    """The network ``name`` (a key of MODELS or PRETRAINED), freshly initialised.

    ``width_multiplier`` scales the base ``width`` and so every layer after it.
    A PRETRAINED network needs ``view`` and ignores both widths (the trunk takes
    ``trunk_blocks``); its ImageNet
    weights are loaded by ``tasks.efficientnet.load_imagenet_weights``.
    """
    if name in PRETRAINED:
        if view is None:
            raise ValueError(f"model {name!r} needs an InputView (its input statistics and size)")
        return PRETRAINED[name](in_channels, num_classes, dropout, view, trunk_blocks)
    if name not in MODELS:
        valid = ", ".join([*MODELS, *PRETRAINED])
        raise ValueError(f"unknown model {name!r}; valid choices: {valid}")
    return MODELS[name](in_channels, num_classes, scaled(width, width_multiplier), dropout)


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) init for convs feeding ReLUs, BN as identity, small linear heads."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
