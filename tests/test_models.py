"""The networks: output shapes at any size, the factory's errors, student smaller than teacher."""

from __future__ import annotations

import pytest
import torch

from tasks.data.pixels import ChannelStats
from tasks.models import MODELS, InputView, build_model, count_params
from tasks.params import Params


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 28])
def test_logits_shape(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, num_classes=5, width=4, dropout=0.1).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, channels, size, size))
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_parameters(name: str) -> None:
    small = count_params(build_model(name, 1, 10, width=4, dropout=0.0))
    large = count_params(build_model(name, 1, 10, width=8, dropout=0.0))
    assert 0 < small < large


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'vit'") as info:
        build_model("vit", 1, 10, width=4, dropout=0.0)
    assert "valid choices: resnet, cnn, mobilenet" in str(info.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_multiplier_scales_every_layer(name: str) -> None:
    half = build_model(name, 1, 10, width=8, dropout=0.0, width_multiplier=0.5)
    assert count_params(half) == count_params(build_model(name, 1, 10, width=4, dropout=0.0))


def test_mobilenet_is_depthwise_separable_and_smaller_than_the_plain_cnn() -> None:
    model = build_model("mobilenet", 1, 10, width=16, dropout=0.0)
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 5
    # 8x the base width at the end, yet fewer weights than the cnn's 4x
    assert count_params(model) < count_params(build_model("cnn", 1, 10, width=16, dropout=0.0))


def test_student_is_at_most_a_quarter_of_the_teacher(params: Params) -> None:
    def size(section) -> int:
        view = InputView(ChannelStats((0.5,), (0.25,)), 32)  # what a pretrained teacher needs
        model = build_model(section.model, 1, 10, section.width, section.dropout, view=view)
        return count_params(model)

    assert size(params.distill) * 4 <= size(params.train)
