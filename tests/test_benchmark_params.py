"""benchmarks/pipeline.py's params overrides, and the Fashion-MNIST recipe they carry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks.pipeline import STAGES, apply_overrides, overrides_from, run_pipeline
from tasks.models import build_model
from tasks.params import load_params
from tests.fashion_mnist import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "fashion_mnist.yaml"
GPU_RECIPE = ROOT / "benchmarks" / "fashion_mnist_gpu.yaml"
# The README's few-minute check of the recipe: every stage of it, on 150 images a class
# (60 steps a fit: too few to pass the baseline guard, hence allow_weak).
SMOKE = [
    "data.max_per_class=150", "train.epochs=15", "distill.epochs=15", "train.min_steps=0",
    "distill.min_steps=0", "train.allow_weak=true", "distill.allow_weak=true",
    "quantize.qat_epochs=1",
]  # fmt: skip


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


@pytest.mark.parametrize("recipe", [RECIPE, GPU_RECIPE], ids=lambda path: path.stem)
def test_the_fashion_mnist_recipes_are_valid_params_with_a_student_under_100k(
    repo: Path, recipe: Path
) -> None:
    params = apply_overrides(repo, overrides_from(recipe, []))
    load_params(repo / "params.yaml")
    assert params["data"]["source"] == "fashion-mnist"
    assert params["data"]["max_per_class"] is None  # the whole dataset
    student = params["distill"]
    model = build_model(student["model"], 1, 10, student["width"], student["dropout"])
    assert sum(p.numel() for p in model.parameters()) < 100_000


@pytest.mark.slow
@needs_fashion_mnist
def test_the_recipe_smoke_run_goes_through_every_stage() -> None:
    """The CPU recipe as the README's quick check runs it: a recipe that no longer runs
    (a renamed key, a model the quantizer cannot export) fails here, not after an hour."""
    run = run_pipeline(overrides_from(RECIPE, SMOKE), log=lambda line: None)
    assert list(run["stage_seconds"]) == list(STAGES)
    assert run["noop_repro_ran"] == []
    metrics = run["metrics"]
    assert metrics["prepare"]["num_classes"] == 10
    prepare = metrics["prepare"]
    assert prepare["images"] == 1500
    assert abs(prepare["test_size"] - 1500 / 7) < 5  # the official test split's share, capped
    assert metrics["train"]["epochs_run"] == 15 and metrics["distill"]["epochs_run"] == 15
    assert metrics["distill"]["params"] < 100_000
    low, high = metrics["distill"]["kd_gain_ci"]
    assert low <= high
    for variant in ("teacher", "student", "student_int8"):
        # 60 steps learn something (the smoke run here: 0.53-0.71), not everything: chance is 0.1
        assert metrics["evaluate"][variant]["accuracy"] > 0.3
