"""benchmarks/pipeline.py's params overrides, and the Fashion-MNIST recipe they carry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks.pipeline import apply_overrides, overrides_from
from tasks.models import build_model
from tasks.params import load_params

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "fashion_mnist.yaml"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_set_goes_after_the_file_and_values_are_yaml(tmp_path: Path) -> None:
    overrides = tmp_path / "o.yaml"
    overrides.write_text("train: {epochs: 5, lr: 0.01}\nseed: 1\n")
    merged = overrides_from(overrides, ["train.epochs=7", "distill.precision=bf16", "seed=3"])
    assert merged == {
        "train": {"epochs": 7, "lr": 0.01},
        "distill": {"precision": "bf16"},
        "seed": 3,
    }


def test_apply_keeps_every_other_key_and_validates(repo: Path) -> None:
    before = yaml.safe_load((repo / "params.yaml").read_text())
    after = apply_overrides(repo, {"train": {"epochs": 3}, "seed": 7})
    assert after == yaml.safe_load((repo / "params.yaml").read_text())
    assert (after["train"]["epochs"], after["seed"]) == (3, 7)
    assert after["train"]["lr"] == before["train"]["lr"]
    assert after["distill"] == before["distill"]


@pytest.mark.parametrize(
    ("assignment", "named"),
    [("train.epoch=3", "train.epoch"), ("train.epochs=-1", "train.epochs"), ("x", "--set")],
)
def test_a_wrong_override_fails_at_once_naming_the_key(
    repo: Path, assignment: str, named: str
) -> None:
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")):
        apply_overrides(repo, overrides_from(None, [assignment]))


def test_the_fashion_mnist_recipe_is_valid_params_with_a_student_under_100k(repo: Path) -> None:
    params = apply_overrides(repo, overrides_from(RECIPE, []))
    load_params(repo / "params.yaml")
    assert params["data"]["source"] == "fashion-mnist"
    student = params["distill"]
    model = build_model(student["model"], 1, 10, student["width"], student["dropout"])
    assert sum(p.numel() for p in model.parameters()) < 100_000
