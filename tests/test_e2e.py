"""End to end: `dvc repro` on tiny params in a fresh copy of the repository.

Starts a real local Prefect server (the same code path a user's first
``dvc repro`` takes), runs the whole pipeline, and checks the outputs, the
MLflow runs, DVC's no-op on a second run, and that a distill param re-runs
only distill, quantize and evaluate.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

from benchmarks.workspace import copy_env, fresh_copy, git
from tasks.evaluation.robustness import CORRUPTIONS
from tasks.servers import local_server_url, start_local_server, stop_local_server
from tests.imagefolders import noise
from tests.tinyrepo import TINY, set_params

VARIANTS = ("teacher", "student", "student_int8")
CONTRACT_KEYS = (
    "accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
    "balanced_accuracy", "params", "size_bytes", "latency_ms_b1", "ece", "roc_auc_ovr",
    "pr_auc_macro", "temperature", "latency_ms_b64", "p95_ms_b1", "throughput_ips_b64",
)  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real local Prefect server, started the way a stage starts one, stopped afterwards."""
    state = tmp_path_factory.mktemp("prefect-state")
    url = start_local_server(state)
    yield url, state
    assert stop_local_server(state)
    assert local_server_url(state) is None


def _dvc(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def _stage_env(url: str, state: Path) -> dict[str, str]:
    return copy_env(state, PREFECT_API_URL=url)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    """The tiny pipeline, run once for the module: (repo, env, first dvc repro output)."""
    repo = fresh_copy(tmp_path_factory.mktemp("repo"))
    set_params(repo, TINY)
    git(repo, "commit", "-qam", "tiny params")
    env = _stage_env(*prefect_api)
    return repo, env, _dvc(repo, env, "repro")


def test_repro_runs_every_stage_and_writes_the_contract(pipeline):
    repo, _, output = pipeline
    assert _ran(output) == ["prepare", "resample", "train", "distill", "quantize", "evaluate"]

    results = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(results) == {*VARIANTS, "baselines", "runtime_versions"}
    assert set(results["runtime_versions"]) == {"torch", "onnxruntime"}  # once, not in the keys
    prepare = json.loads((repo / "metrics/prepare.json").read_text())
    assert (prepare["image_size"], prepare["channels"]) == (8, 1)  # channels: auto on digits
    for name in ("majority", "linear"):
        assert results["baselines"][name]["f1_macro"] == prepare["baselines"][name]["test_f1_macro"]
    for stage in ("train", "distill"):  # TINY allows weak models; the check still ran
        fit = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert fit["baseline"] == "linear" and isinstance(fit["weak"], bool)
    teacher = json.loads((repo / "metrics/train.json").read_text())
    assert teacher["params"] == 3_383_818  # EfficientNet-Lite0 with a 10-way head
    report = (repo / "reports/evaluation/report.md").read_text()
    assert "| baseline: linear |" in report
    results = {name: results[name] for name in VARIANTS}
    for variant, metrics in results.items():
        for key in CONTRACT_KEYS:
            assert isinstance(metrics[key], int | float) and math.isfinite(metrics[key]), key
        assert 0.0 <= metrics["f1_macro"] <= 1.0
        assert metrics["latency_ms_b1"] > 0
        assert len(metrics["f1_per_class"]) == 10
        assert (repo / f"reports/confusion/{variant}.png").read_bytes()[:4] == b"\x89PNG"
        rows = (repo / f"reports/confusion/{variant}.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted"
        assert len(rows) - 1 == json.loads((repo / "metrics/prepare.json").read_text())["test_size"]

    assert (
        results["student_int8"]["size_bytes"] == (repo / "models/student_int8.onnx").stat().st_size
    )
    for variant, metrics in results.items():
        low, high = metrics["f1_macro_ci"]
        assert low <= metrics["f1_macro"] <= high
        assert 0.0 <= metrics["ece"] <= 1.0 and metrics["temperature"] > 0
        assert 0.0 <= metrics["roc_auc_ovr"] <= 1.0
        for name in ("per_class.csv", "reliability.png", "roc_pr.png"):
            assert (repo / f"reports/evaluation/{variant}_{name}").is_file(), (variant, name)
    report = (repo / "reports/evaluation/report.md").read_text()
    for section in ("Per class", "Robustness", "Calibration", "compression step", "Grad-CAM"):
        assert section in report
    for variant in ("teacher", "student"):  # int8 has no gradients: its student explains it
        assert (repo / f"reports/evaluation/{variant}_grad_cam.png").is_file()
        assert set(results[variant]["robustness"]) == set(CORRUPTIONS)
    for candidate, reference in (("student", "teacher"), ("student_int8", "student")):
        step = results[candidate][f"vs_{reference}"]
        assert 0.0 <= step["mcnemar_p"] <= 1.0
        delta = (repo / f"reports/evaluation/delta_{candidate}_vs_{reference}.csv").read_text()
        assert delta.splitlines()[0] == "actual,predicted,delta"
        assert len(delta.splitlines()) == 1 + 10 * 10
    assert results["student"]["params"] < results["teacher"]["params"]
    assert results["student_int8"]["params"] == results["student"]["params"]
    assert results["student_int8"]["size_bytes"] < results["student"]["size_bytes"]
    runtimes = set(results["student"]["latency_by_runtime"])
    assert runtimes == {"torch-eager", "onnxruntime-fp32"}  # no versions in the keys
    assert results["student"]["runtime"] in runtimes
    targets = results["student_int8"]["targets"]
    assert set(targets) == {"size_ratio", "latency_ratio_b64", "f1_macro_drop"}
    assert all(isinstance(t["met"], bool) for t in targets.values())

    distill = json.loads((repo / "metrics/distill.json").read_text())
    assert distill["kd_gain"] == pytest.approx(
        distill["test_f1_macro"] - distill["scratch_test_f1_macro"]
    )
    quantize = json.loads((repo / "metrics/quantize.json").read_text())
    assert quantize["method_used"] in ("ptq", "qat")
    assert quantize["int8_ops"].get("BatchNormalization", 0) == 0


def test_mlflow_holds_one_run_per_variant_with_lineage(pipeline):
    repo, _, _ = pipeline
    results = json.loads((repo / "metrics/evaluate.json").read_text())
    baselines = results.pop("baselines")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data_md5 = next(
        o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared"
    )
    commit = git(repo, "rev-parse", "HEAD")

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["visionpipe"], output_format="list")
    evaluations = {r.data.tags["variant"]: r for r in runs if r.data.tags["stage"] == "evaluate"}
    assert set(evaluations) == set(VARIANTS)
    client = mlflow.MlflowClient()
    for variant, run in evaluations.items():
        assert run.info.run_name == variant
        for key in CONTRACT_KEYS:
            assert run.data.metrics[key] == pytest.approx(results[variant][key])
        linear = run.data.metrics["baseline.linear.f1_macro"]
        assert linear == pytest.approx(baselines["linear"]["f1_macro"])
        assert run.data.tags["data_hash"] == data_md5
        assert run.data.tags["git_commit"] == commit
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            f"{variant}.png", f"{variant}_per_class.csv", f"{variant}_reliability.png",
            "per_class.json", "report.md",
        } <= artifacts  # fmt: skip
        assert run.data.params  # the variant's own training params

    fits = {r.data.tags["variant"]: r for r in runs if r.data.tags["stage"] in ("train", "distill")}
    assert set(fits) == {"teacher", "student", "student_scratch"}
    for variant, stage in (("teacher", "train"), ("student", "distill")):
        run = fits[variant]
        history = client.get_metric_history(run.info.run_id, "val_f1_macro")
        epochs_run = json.loads((repo / f"metrics/{stage}.json").read_text())["epochs_run"]
        assert [m.step for m in history] == list(range(1, epochs_run + 1))
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"augment.yaml", "augment_grid.png"} <= logged, stage
    assert fits["teacher"].data.params["train.width"] == "8"
    # the scratch twin is a full run of its own, and the distilled run knows the gain
    scratch = fits["student_scratch"]
    assert scratch.data.metrics["test_f1_macro"] == pytest.approx(
        fits["student"].data.metrics["scratch_test_f1_macro"]
    )
    assert "kd_gain" in fits["student"].data.metrics


def test_second_repro_is_a_no_op_and_distill_params_rerun_only_downstream(pipeline):
    repo, env, _ = pipeline
    assert _ran(_dvc(repo, env, "repro")) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["alpha"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc(repo, env, "repro")) == ["distill", "quantize", "evaluate"]
    assert "up to date" in _dvc(repo, env, "status").lower()


def test_the_local_prefect_server_is_reused_not_restarted(prefect_api):
    url, state = prefect_api
    assert start_local_server(state) == url


def test_a_bad_param_fails_fast_naming_the_key(pipeline):
    repo, env, _ = pipeline
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["resample"]["strategy"] = "smtoe"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "flows.prepare"], cwd=repo, env=env, capture_output=True,
            text=True,
        )  # fmt: skip
    finally:
        path.write_text(original)
    assert result.returncode == 2
    assert "resample.strategy" in result.stderr and "random_over" in result.stderr


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise((10, 10, 3), seed)).save(path)


def test_prepare_follows_the_content_of_a_dvc_tracked_image_folder(prefect_api, tmp_path):
    repo = fresh_copy(tmp_path / "repo")
    env = _stage_env(*prefect_api)
    folder = repo / "data/raw/shapes"
    for i in range(36):
        _image(folder / f"class{i % 3}" / f"{i}.png", seed=i)
    set_params(repo, {"data": {"source": "data/raw/shapes", "image_size": 8}})
    _dvc(repo, env, "add", "data/raw/shapes")
    assert "/shapes" in (repo / "data/raw/.gitignore").read_text().split()
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "track shapes with DVC")

    def prepared_images() -> int:
        return json.loads((repo / "metrics/prepare.json").read_text())["images"]

    def raw_md5() -> str:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return next(d["md5"] for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw")

    assert _ran(_dvc(repo, env, "repro", "prepare")) == ["prepare"]
    assert prepared_images() == 36
    assert json.loads((repo / "reports/data_quality.json").read_text())["content_versioned"]
    first = raw_md5()
    assert _ran(_dvc(repo, env, "repro", "prepare")) == []  # nothing changed: a no-op

    _image(folder / "class1/1.png", seed=1000)  # edit one image
    assert "data/raw" in _dvc(repo, env, "status", "prepare")
    assert _ran(_dvc(repo, env, "repro", "prepare")) == ["prepare"]
    edited = raw_md5()
    assert edited != first

    _image(folder / "class2/new.png", seed=2000)  # add one
    assert _ran(_dvc(repo, env, "repro", "prepare")) == ["prepare"]
    assert prepared_images() == 37

    (folder / "class0/0.png").unlink()  # remove one
    assert _ran(_dvc(repo, env, "repro", "prepare")) == ["prepare"]
    assert prepared_images() == 36
    assert raw_md5() not in (first, edited)
    assert _ran(_dvc(repo, env, "repro", "prepare")) == []
