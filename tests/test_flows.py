"""Prefect is the thing under test here: flows run under prefect_test_harness and record tasks."""

from __future__ import annotations

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.resample import resample_flow
from tasks.datasets import ChannelStats, Split, write_prepared
from tasks.layout import RESAMPLED_DIR, metrics_path
from tasks.params import ResampleParams

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def prepared_on_disk(tmp_path, monkeypatch):
    """A tiny imbalanced prepared dataset (counts 12/6/3) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [12, 6, 3])
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 1), dtype=np.uint8)
    split = Split(images, labels)
    write_prepared(
        tmp_path / "data/prepared",
        {"train": split, "val": split, "test": split},
        CLASSES,
        ChannelStats.of(images),
    )
    return tmp_path


def _task_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted(run.name.rsplit("-", 1)[0] for run in runs)


def test_resample_flow_completes_and_records_each_task(harness, prepared_on_disk):
    params = ResampleParams(strategy="random_over", sampling_strategy="auto", k_neighbors=2)
    state = resample_flow(seed=0, resample=params, return_state=True)

    assert state.is_completed()
    metrics = state.result()
    assert metrics["class_counts_after"] == {"a": 12, "b": 12, "c": 12}
    assert metrics_path("resample").is_file()
    assert len(np.load(RESAMPLED_DIR / "indices.npy")) == 36
    assert _task_names(state.state_details.flow_run_id) == ["resample", "write-resampled"]


def test_a_failing_task_fails_the_flow_and_leaves_no_output(harness, prepared_on_disk):
    # SMOTE cannot find 5 neighbours in a class of 3: a clear error, no partial output.
    params = ResampleParams(strategy="smote", sampling_strategy="auto", k_neighbors=5)
    state = resample_flow(seed=0, resample=params, return_state=True)

    assert state.is_failed()
    with pytest.raises(ValueError, match=r"resample\.k_neighbors=5"):
        state.result()
    assert not RESAMPLED_DIR.exists()
    assert not metrics_path("resample").exists()
