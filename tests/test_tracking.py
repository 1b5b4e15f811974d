"""MLflow runs never stay RUNNING forever: an abandoned run is closed when next seen."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException

from flows.prefect_api import mlflow_lost
from tasks.evaluation.results import ORT_INT8
from tasks.tracking import ABANDONED_TAG, OWNER_TAG, process_owner, scalar_metrics, start_run
from tests.evaluations import evaluate_results


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


@pytest.mark.integration
def test_a_run_whose_process_died_is_marked_failed_by_the_next_run(store) -> None:
    experiment = store.create_experiment("abandoned", artifact_location="mlruns/abandoned")
    dead = subprocess.Popen(["sleep", "30"])
    owner = process_owner(dead.pid)  # recorded while it runs, as a stage records itself
    dead.kill()
    dead.wait()
    orphan = store.create_run(experiment, tags={OWNER_TAG: owner}).info.run_id
    alive = store.create_run(experiment, tags={OWNER_TAG: process_owner()}).info.run_id
    foreign = store.create_run(experiment).info.run_id  # not ours to judge: no owner
    elsewhere = store.create_run(experiment, tags={OWNER_TAG: "other-host:1:1"}).info.run_id

    with start_run("abandoned", "train", stage="train", variant="teacher", params={}) as run:
        assert run.data.tags[OWNER_TAG] == process_owner()

    statuses = {i: store.get_run(i).info.status for i in (orphan, alive, foreign, elsewhere)}
    assert statuses == {
        orphan: "FAILED",
        alive: "RUNNING",
        foreign: "RUNNING",
        elsewhere: "RUNNING",
    }
    assert owner in store.get_run(orphan).data.tags[ABANDONED_TAG]
    assert store.get_run(run.info.run_id).info.status == "FINISHED"


def test_scalar_metrics_flattens_splits_intervals_and_drops_non_numbers() -> None:
    metrics = {
        "f1_macro": 0.9,
        "params": 1234,
        "runtime": "onnxruntime-int8",
        "stopped_early": True,
        "note": None,
        "f1_per_class": {"T-shirt/top": 0.8, "Ankle boot": 0.7, "what?": 0.1},
        "student": {"latency": {"median_ms": 0.2, "unit": "ms"}},
        "kd_gain_ci": [-0.01, 0.03],  # an interval: two metrics
        "latency_ms": [0.2, 0.3, 0.25],  # any other list: none
    }
    assert scalar_metrics(metrics) == {
        "f1_macro": 0.9,
        "params": 1234.0,
        "stopped_early": 1.0,
        "f1_per_class.T-shirt/top": 0.8,
        "f1_per_class.Ankle boot": 0.7,
        "f1_per_class.what_": 0.1,  # characters MLflow rejects become "_"
        "student.latency.median_ms": 0.2,
        "kd_gain_ci_low": -0.01,
        "kd_gain_ci_high": 0.03,
    }
    assert all(isinstance(value, float) for value in scalar_metrics(metrics).values())


def test_new_latency_numbers_become_mlflow_metrics() -> None:
    flat = scalar_metrics(
        evaluate_results(int8_b1=0.08, int8_b64=1.0, int8_bytes=35_000)["student_int8"]
    )
    for key in ("latency_ms_b1", "p95_ms_b1", "latency_ms_b64", "throughput_ips_b64"):
        assert flat[key] > 0
        assert flat[f"latency_by_runtime.{ORT_INT8}.{key}"] == flat[key]
    assert "runtime" not in flat  # a string: logged as the run's tag instead
    assert flat["targets.size_ratio.value"] == pytest.approx(0.35)
    assert flat["targets.size_ratio.met"] == 0.0
    assert flat["targets.latency_ratio_b64.met"] == 1.0


def test_a_dead_mlflow_server_is_told_by_the_exception_type_not_its_text():
    def raised(transport: BaseException) -> BaseException:
        try:
            try:
                raise transport
            except Exception as e:  # as MLflow's REST client wraps it, message and all
                raise MlflowException(f"API request to http://x failed: {e}")  # noqa: B904
        except MlflowException as wrapped:
            return wrapped

    assert mlflow_lost(raised(requests.exceptions.ConnectionError("refused"))) is not None
    assert mlflow_lost(raised(requests.exceptions.ReadTimeout("slow"))) is not None
    # the same words without a transport failure underneath are some other error
    assert mlflow_lost(MlflowException("API request to http://x failed: bad params")) is None
    assert mlflow_lost(raised(ValueError("not the network"))) is None
