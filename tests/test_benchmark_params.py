"""benchmarks/pipeline.py's params overrides, and the Fashion-MNIST recipe they carry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.machine import RESULTS_ENV
from benchmarks.pipeline import SMOKE, STAGES, apply_overrides, overrides_from
from tasks.models import build_model
from tasks.params import load_params
from tests.fashion_mnist import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "fashion_mnist.yaml"
GPU_RECIPE = ROOT / "benchmarks" / "fashion_mnist_gpu.yaml"


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
def test_the_recipe_smoke_run_goes_through_every_stage(tmp_path: Path) -> None:
    """The CPU recipe as the README's quick check runs it (``pipeline.py --smoke``): a recipe
    that no longer runs (a renamed key, a model the quantizer cannot export) fails here, not
    after an hour."""
    env = {**os.environ, RESULTS_ENV: str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "benchmarks/pipeline.py", "--params", str(RECIPE), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads((tmp_path / "pipeline_fashion-mnist_cpu_smoke.json").read_text())
    assert list(run["stage_seconds"]) == list(STAGES)
    assert run["noop_repro_ran"] == []
    assert run["params"]["train"]["model"] == "resnet"  # the recipe, under the smoke sizes
    assert run["params"]["train"]["batch_size"] == SMOKE["train"]["batch_size"]
    metrics = run["metrics"]
    assert metrics["prepare"]["num_classes"] == 10
    prepare = metrics["prepare"]
    assert prepare["images"] == 1000
    assert abs(prepare["test_size"] - 1000 / 7) < 5  # the official test split's share, capped
    epochs = SMOKE["train"]["epochs"]
    assert metrics["train"]["epochs_run"] == epochs and metrics["distill"]["epochs_run"] == epochs
    assert metrics["distill"]["params"] < 100_000
    low, high = metrics["distill"]["kd_gain_ci"]
    assert low <= high
    for variant in ("teacher", "student", "student_int8"):
        # 66 steps learn something (the smoke run here: 0.51-0.61), not everything: chance is 0.1
        assert metrics["evaluate"][variant]["accuracy"] > 0.3
