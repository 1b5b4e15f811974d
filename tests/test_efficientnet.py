"""EfficientNet-Lite0: the architecture agrees with the shipped ImageNet weights, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images
from torch import nn

from tasks.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from tasks.data.pixels import ChannelStats
from tasks.efficientnet import (
    DepthwiseConv2d,
    PretrainedInput,
    WeightsError,
    auto_input_size,
    input_size_of,
    load_imagenet_weights,
    packaged_weights,
    used_taps,
    weight_key_map,
)
from tasks.models import InputView, build_model, count_params

# ImageNet classes of buildings: church, palace, bell cote, dome, stupa, monastery, castle.
BUILDINGS = {497, 698, 442, 538, 832, 663, 483}
UNIT = ChannelStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # inputs are the [0, 1] pixels
UNIT_GRAY = ChannelStats((0.0,), (1.0,))


def _imagenet_model(size: int = 224) -> nn.Module:
    model = build_model("efficientnet_lite0", 3, 1000, 0, 0.2, view=InputView(UNIT, size))
    load_imagenet_weights(model, packaged_weights().path, keep_head=True)
    return model.eval()


@pytest.fixture(scope="module")
def china() -> torch.Tensor:
    """scikit-learn's sample photo of a Chinese temple, centre-cropped to 224x224, [0, 1]."""
    image = load_sample_images().images[0]
    height, width, _ = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = np.ascontiguousarray(image[top : top + side, left : left + side])
    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True)


def _top5(model: nn.Module, image: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(image).topk(5).indices[0].tolist()


def test_the_packaged_weights_name_a_temple_photo_a_building(china):
    top5 = _top5(_imagenet_model(), china)
    assert top5[0] in BUILDINGS, top5
    assert len(BUILDINGS & set(top5)) >= 2, top5


@pytest.mark.parametrize("layer", ["features.1.0.weight", "features.3.depthwise.0.weight"])
def test_shuffled_early_weights_no_longer_see_a_building(china, layer):
    model = _imagenet_model()
    weight = model.state_dict()[layer]
    generator = torch.Generator().manual_seed(0)
    shuffled = weight.flatten()[torch.randperm(weight.numel(), generator=generator)]
    weight.copy_(shuffled.view_as(weight))
    top5 = _top5(model, china)
    assert len(BUILDINGS & set(top5)) < 2, top5


def test_every_shipped_tensor_has_one_place_and_the_model_has_4_65m_params():
    raw = torch.load(packaged_weights().path, map_location="cpu", weights_only=True)
    assert len(raw) == 296
    model = _imagenet_model()
    names = {weight_key_map(key) for key in raw}
    assert names == set(model.state_dict())  # one to one, nothing left over
    assert count_params(model) == sum(
        v.numel() for k, v in raw.items() if not k.endswith(("running_mean", "running_var"))
        and not k.endswith("num_batches_tracked")
    ) == 4_652_008  # fmt: skip


def test_the_head_is_new_for_the_data_classes_and_the_backbone_is_imagenets():
    model = build_model("efficientnet_lite0", 3, 7, 0, 0.2, view=InputView(UNIT, 64))
    before = model.head[2].weight.clone()
    weights = packaged_weights().path
    load_imagenet_weights(model, weights)
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    assert model.head[2].weight.shape == (7, 1280)
    assert torch.equal(model.head[2].weight, before)
    assert torch.equal(model.features[1][0].weight, raw["_conv_stem.weight"])
    assert torch.equal(model.features[-1][1].running_var, raw["_bn1.running_var"])


def test_a_missing_truncated_or_foreign_weights_file_is_an_error_naming_the_key(tmp_path):
    model = build_model("efficientnet_lite0", 3, 5, 0, 0.2, view=InputView(UNIT, 32))
    with pytest.raises(WeightsError, match=r"train\.pretrained: the weights file .* not exist"):
        load_imagenet_weights(model, tmp_path / "absent.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(packaged_weights().path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=r"cannot read the weights file"):
        load_imagenet_weights(model, truncated)
    foreign = tmp_path / "resnet.pth"
    torch.save(build_model("resnet", 3, 5, 8, 0.0).state_dict(), foreign)
    with pytest.raises(WeightsError, match=r"'features.0.0.weight' has shape|has no place"):
        load_imagenet_weights(model, foreign)
    partial = tmp_path / "partial.pth"
    raw = torch.load(packaged_weights().path, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in raw.items() if not k.startswith("_blocks.15.")}, partial)
    with pytest.raises(WeightsError, match=r"lacks 18 of efficientnet_lite0's tensors"):
        load_imagenet_weights(model, partial)


def test_the_trunk_student_is_the_first_blocks_of_imagenets_network_under_100k_params(tmp_path):
    trunk = build_model("efficientnet_lite0_trunk", 1, 10, 0, 0.1, view=InputView(UNIT_GRAY, 32))
    full = _imagenet_model(32)
    weights = packaged_weights().path
    load_imagenet_weights(trunk, weights, section="distill")
    trunk.eval()
    assert count_params(trunk) == 88_394 < 100_000
    assert len(trunk.features) == 2 + 6 and trunk.head[2].in_features == 80
    for key, tensor in trunk.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(tensor, full.state_dict()[key]), key
    # Its features agree with the whole network's on the same (grayscale) image.
    gray = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trunk.features(gray), full.features[:8](gray), atol=1e-5)
    # The deeper blocks are left out, but what the trunk has must still be in the file.
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in raw.items() if not k.startswith("_blocks.2.")}, partial)
    with pytest.raises(WeightsError, match=r"distill\.pretrained: .* lacks 18 of"):
        load_imagenet_weights(trunk, partial, section="distill")


@pytest.mark.parametrize(("blocks", "channels", "params"), [(4, 40, 29_387), (8, 80, 254_227)])
def test_trunk_blocks_sets_the_students_depth_and_a_checkpoint_rebuilds_it(
    tmp_path, blocks: int, channels: int, params: int
):
    """``trunk_blocks`` (distill.trunk_blocks): shallower or deeper than the default 6,
    ImageNet weights for every block kept, and the checkpoint rebuilds the same depth."""
    trunk = build_model(
        "efficientnet_lite0_trunk", 1, 3, 0, 0.1, view=InputView(UNIT_GRAY, 32), trunk_blocks=blocks
    )
    load_imagenet_weights(trunk, packaged_weights().path, section="distill")
    assert len(trunk.features) == 2 + blocks and trunk.head[2].in_features == channels
    assert count_params(trunk) == params
    saved = save_checkpoint(
        tmp_path / "student.pt",
        Checkpoint(
            model_name="efficientnet_lite0_trunk", width=0, dropout=0.1, in_channels=1,
            image_size=16, classes=("a", "b", "c"), stats=UNIT_GRAY, params={}, metrics={},
            state_dict=trunk.state_dict(), input_size=32, trunk_blocks=blocks,
        ),
    )  # fmt: skip
    rebuilt = load_checkpoint(saved).build()
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), trunk.eval()(images))


def test_the_input_view_undoes_the_data_standardisation_and_replicates_grayscale():
    stats = ChannelStats((0.3,), (0.2,))
    view = PretrainedInput(stats, 32)
    pixels = torch.rand(2, 1, 16, 16)
    standardised = (pixels - 0.3) / 0.2
    out = view(standardised)
    assert out.shape == (2, 3, 32, 32)
    expected = F.interpolate((pixels - 127 / 255) / (128 / 255), size=(32, 32), mode="bilinear")
    for channel in range(3):
        assert torch.allclose(out[:, channel : channel + 1], expected, atol=1e-5)
    model = build_model("efficientnet_lite0", 1, 3, 0, 0.0, view=InputView(stats, 48))
    assert input_size_of(model) == 48
    assert input_size_of(build_model("cnn", 1, 3, 4, 0.0)) is None


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_conv_with_cropped_taps_equals_the_plain_conv(size, kernel, stride):
    torch.manual_seed(size)
    fast = DepthwiseConv2d(6, 6, kernel, stride, kernel // 2, groups=6, bias=False)
    plain = nn.Conv2d(6, 6, kernel, stride, kernel // 2, groups=6, bias=False)
    plain.weight.data.copy_(fast.weight.data)
    x = torch.randn(3, 6, size, size + 1, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    out, reference = fast(x), plain(x_plain)
    assert out.shape == reference.shape
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-4)
    assert torch.allclose(x.grad, x_plain.grad, atol=1e-5)


def test_used_taps_on_maps_smaller_than_the_kernel():
    assert used_taps(1, 5, 1, 2) == (2, 2)  # a 1x1 map: only the centre tap
    assert used_taps(2, 5, 1, 2) == (1, 3)
    assert used_taps(8, 5, 1, 2) == (0, 4)
    assert used_taps(2, 3, 2, 1) == (1, 2)  # stride 2 never reads the left padding here


@pytest.mark.parametrize(
    ("stored", "channels", "expected"),
    [(8, 1, 32), (16, 1, 32), (28, 1, 56), (32, 1, 64), (16, 3, 48), (32, 3, 96), (64, 3, 96)],
)
def test_auto_input_size_is_twice_the_stored_size_for_grayscale_three_times_for_colour(
    stored: int, channels: int, expected: int
) -> None:
    assert auto_input_size(stored, "auto", channels) == expected
    assert auto_input_size(stored, 40, channels) == 40  # a number is kept as it is
