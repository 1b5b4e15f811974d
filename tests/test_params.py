"""params.yaml validation: the real file passes; each kind of typo fails naming its key."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.params import (
    BUILTIN_SOURCES,
    CalibrationName,
    ClassWeightName,
    LossName,
    ModelName,
    Params,
    ParamsError,
    SamplerName,
    load_params,
    parse_params,
)

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(PARAMS_YAML.read_text())


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    edited = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    section = edited
    for key in parents:
        section = section[key]
    section[leaf] = value
    return edited


def _error(edited: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(edited)
    return str(info.value)


def test_real_params_validate(params: Params, raw: dict[str, Any]) -> None:
    assert isinstance(params, Params)
    assert parse_params(raw) == params
    # flat() is the form MLflow params and checkpoints carry: dotted keys, yaml values.
    assert params.train.flat("train")["train.lr"] == raw["train"]["lr"]
    assert set(params.distill.flat("distill")) == {f"distill.{key}" for key in raw["distill"]}


def test_params_error_is_a_value_error() -> None:
    assert issubclass(ParamsError, ValueError)


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("data.source", "mnist", ["data.source", "digits", "fashion-mnist", "'mnist'"]),
        ("resample.strategy", "smtoe", ["resample.strategy", "'random_over'", "'smtoe'"]),
        ("resample.space", "latent", ["resample.space", "'pixels'", "'embeddings'"]),
        ("resample.embedding_checkpoint", "nope.pt", ["resample.embedding_checkpoint", "null"]),
        ("train.loss", "focall", ["train.loss", "'ce'", "'focal'"]),
        ("distill.class_weight", "inv", ["distill.class_weight", "'effective_number'"]),
        ("augment.minority_boost", 0.5, ["augment.minority_boost", "greater than or equal to 1"]),
        ("evaluate.logit_adjust_tau", -1, ["evaluate.logit_adjust_tau", "greater than or equal"]),
        ("train.model", "resnte", ["train.model", "'resnet'", "'cnn'"]),
        ("distill.model", "cnnn", ["distill.model", "'resnet'", "'cnn'"]),
        ("train.lr", "fast", ["train.lr", "'fast'"]),
        ("train.lerning_rate", 0.01, ["train.lerning_rate", "not permitted"]),
        ("quantize.calibration_method", "max", ["quantize.calibration_method", "'minmax'"]),
        ("data.channels", 2, ["data.channels", "1, 3 or 'auto'", "(got 2)"]),
        ("data.resize", "squash", ["data.resize", "'stretch'", "'pad'", "'center_crop'"]),
        ("data.imbalance_ratio", 0.5, ["data.imbalance_ratio", "greater than or equal to 1"]),
        ("data.max_per_class", 5, ["data.max_per_class", "below data.min_per_class (10)"]),
        ("data.min_per_class", 1, ["data.min_per_class", "greater than or equal to 3"]),
        ("data.workers", "many", ["data.workers", "'auto'", "(got 'many')"]),
        ("data.workers", 0, ["data.workers", "greater than or equal to 1"]),
        ("data.background", 300, ["data.background", "less than or equal to 255"]),
    ],
)
def test_bad_value_names_key_and_choices(
    raw: dict[str, Any], dotted: str, value: Any, expected: list[str]
) -> None:
    message = _error(_set(raw, dotted, value))
    for fragment in expected:
        assert fragment in message


SECTIONS = [k for k, v in yaml.safe_load(PARAMS_YAML.read_text()).items() if isinstance(v, dict)]


@pytest.mark.parametrize("section", ["", *SECTIONS])
def test_an_unknown_key_is_rejected_in_every_section(raw: dict[str, Any], section: str) -> None:
    dotted = f"{section}.misspelled" if section else "misspelled"
    message = _error(_set(raw, dotted, 1))
    assert f"{dotted}: Extra inputs are not permitted" in message


def test_missing_key_is_named(raw: dict[str, Any]) -> None:
    edited = copy.deepcopy(raw)
    del edited["distill"]["temperature"]
    assert "distill.temperature: missing" in _error(edited)


def test_scale_min_above_scale_max(raw: dict[str, Any]) -> None:
    edited = _set(_set(raw, "augment.scale_min", 1.3), "augment.scale_max", 1.1)
    message = _error(edited)
    assert "augment.scale_max: must not be below augment.scale_min (1.3)" in message


def test_every_bad_key_is_reported_at_once(raw: dict[str, Any]) -> None:
    edited = _set(_set(raw, "train.lr", "fast"), "resample.strategy", "smtoe")
    message = _error(edited)
    assert "train.lr" in message
    assert "resample.strategy" in message


def test_load_params_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_load_params_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def _choices(literal: Any) -> set[str]:
    return set(typing.get_args(literal))


def test_choice_lists_match_the_factories() -> None:
    # params.py keeps its own copies so validating params never imports torch.
    from tasks.data.resample import SAMPLERS
    from tasks.data.sources import SOURCES
    from tasks.export.quantize import CALIBRATION_METHODS
    from tasks.models import MODELS
    from tasks.training.losses import CLASS_WEIGHTS, LOSSES

    assert _choices(SamplerName) == set(SAMPLERS)
    assert _choices(ModelName) == set(MODELS)
    assert _choices(CalibrationName) == set(CALIBRATION_METHODS)
    assert set(BUILTIN_SOURCES) == set(SOURCES)
    assert _choices(LossName) == set(LOSSES)
    assert _choices(ClassWeightName) == set(CLASS_WEIGHTS)


def test_pretrained_needs_a_model_with_imagenet_weights(raw: dict[str, Any]) -> None:
    edited = _set(_set(raw, "train.model", "resnet"), "train.pretrained", True)
    message = _error(edited)
    assert "train.pretrained: true, but train.model 'resnet' has no ImageNet weights" in message
    assert "efficientnet_lite0" in message and "got {" not in message  # no dump of the section
    assert parse_params(_set(edited, "train.pretrained", False)).train.model == "resnet"


def test_a_pretrained_student_needs_a_model_with_imagenet_weights(raw: dict[str, Any]) -> None:
    edited = _set(_set(raw, "distill.model", "cnn"), "distill.pretrained", True)
    message = _error(edited)
    assert "distill.pretrained: true, but distill.model 'cnn' has no ImageNet weights" in message
    assert "efficientnet_lite0_trunk" in message
    assert parse_params(_set(edited, "distill.pretrained", False)).distill.model == "cnn"


def test_a_missing_weights_file_fails_naming_train_weights(raw: dict[str, Any], tmp_path) -> None:
    message = _error(_set(raw, "train.weights", str(tmp_path / "absent.pth")))
    assert "train.weights: must be null (the packaged weights) or an existing .pth file" in message
    present = tmp_path / "lite0.pth"
    present.write_bytes(b"checked when the model is built")
    assert parse_params(_set(raw, "train.weights", str(present))).train.weights == present


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.channels", 2), ("data.image_size", "big"), ("train.input_size", 16),
     ("train.min_steps", -1), ("distill.baseline_margin", 1.0),
     ("distill.model", "efficientnet_b0"), ("distill.input_size", 16)],
)  # fmt: skip
def test_new_keys_reject_bad_values_by_name(raw: dict[str, Any], key: str, value: Any) -> None:
    assert key in _error(_set(raw, key, value))


def test_data_format_may_be_read_off_the_images(raw: dict[str, Any]) -> None:
    params = parse_params(_set(_set(raw, "data.channels", "auto"), "data.image_size", "auto"))
    assert (params.data.channels, params.data.image_size) == ("auto", "auto")
    fixed = parse_params(_set(_set(raw, "data.channels", 3), "data.image_size", 24))
    assert (fixed.data.channels, fixed.data.image_size) == (3, 24)
