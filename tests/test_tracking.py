"""MLflow runs never stay RUNNING forever: an abandoned run is closed when next seen."""

from __future__ import annotations

import subprocess

import mlflow
import pytest

from tasks.tracking import ABANDONED_TAG, OWNER_TAG, process_owner, start_run


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


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
