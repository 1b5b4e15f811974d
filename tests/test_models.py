"""The networks: output shapes at any size, the factory's errors, student smaller than teacher."""

from __future__ import annotations

import pytest
import torch

from tasks.models import MODELS, build_model, count_params
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
    assert "valid choices: resnet, cnn" in str(info.value)


def test_student_is_at_most_a_quarter_of_the_teacher(params: Params) -> None:
    def size(section) -> int:
        return count_params(build_model(section.model, 1, 10, section.width, section.dropout))

    assert size(params.distill) * 4 <= size(params.train)
