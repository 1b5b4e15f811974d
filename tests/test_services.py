"""`visionpipe up` / `down`: real local Prefect and MLflow servers on free loopback ports.

One ``up`` serves the whole module (starting both costs ~10 s on two cores);
its state folder and repository root are temporary, so nothing here touches
the checkout's servers or ``mlflow.db``. The last test stops them; the
fixture's teardown stops them again in case a test failed before that.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from flows.cli import main
from tasks.servers import (
    down,
    free_port,
    healthy,
    home,
    lease,
    mlflow_server_url,
    mlflow_state_dir,
    mlflow_store,
    read_state,
    start_mlflow_server,
    state_dir,
    stop_local_server,
    stop_mlflow_server,
    stop_when_idle,
    up,
)
from tasks.tracking import log_results, start_run
from tasks.tracking_store import tracking_uri

pytestmark = pytest.mark.integration  # real Prefect/MLflow servers


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _write_stale_records(directory: Path) -> None:
    """What a machine that rebooted, or a server that crashed, leaves behind."""
    pid, port = _dead_pid(), free_port()
    # pid_start: were the pid reused meanwhile, the start time would still tell it apart.
    for name, record in (
        ("prefect", {"api_url": f"http://127.0.0.1:{port}/api"}),
        ("mlflow", {"url": f"http://127.0.0.1:{port}", "backend_store_uri": "sqlite:///x.db"}),
    ):
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "server.json").write_text(
            json.dumps({"pid": pid, "pid_start": 1, "port": port, **record})
        )


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """``up`` in a temporary root and VISIONPIPE_HOME that held stale records: (urls, pids)."""
    root, state = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("home")
    _write_stale_records(state)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("VISIONPIPE_HOME", str(state))
        for variable in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
            patch.delenv(variable, raising=False)
        try:
            urls = up()
            pids = {name: read_state(state / name)["pid"] for name in ("prefect", "mlflow")}
            yield urls, pids
        finally:
            down()


def test_up_starts_both_servers_over_stale_records(servers):
    urls, pids = servers
    assert set(urls) == {"prefect_ui", "prefect_api", "mlflow"}
    assert urls["prefect_api"] == urls["prefect_ui"] + "/api"
    assert healthy(urls["prefect_api"])
    with urllib.request.urlopen(f"{urls['mlflow']}/health", timeout=5) as response:
        assert response.read() == b"OK"
    for name, directory in (("prefect", state_dir()), ("mlflow", mlflow_state_dir())):
        assert (directory / "server.log").stat().st_size > 0
        assert not _gone(pids[name])
    assert read_state(mlflow_state_dir())["backend_store_uri"] == mlflow_store()[0]


def test_up_again_reuses_the_same_processes(servers):
    urls, pids = servers
    assert up() == urls
    assert {name: read_state(home() / name)["pid"] for name in pids} == pids


def test_the_cli_prints_the_urls_and_status_shows_the_mlflow_server(servers, capsys):
    urls, _ = servers
    assert main(["up"]) == 0
    out = capsys.readouterr().out
    assert f"Prefect UI:  {urls['prefect_ui']}\n" in out
    assert f"MLflow UI:   {urls['mlflow']}\n" in out
    assert str(mlflow_state_dir()) in out and str(state_dir()) in out
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"MLflow UI:   {urls['mlflow']} (local server" in out
    assert f"MLflow tracking URI: {urls['mlflow']}\n" in out


def test_runs_go_through_the_server_into_the_same_local_store(servers, tmp_path, monkeypatch):
    urls, _ = servers
    root = Path.cwd()
    assert tracking_uri() == urls["mlflow"]
    report = tmp_path / "report.txt"
    report.write_text("hello")
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: monkeypatch restores it after.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    try:
        with start_run("visionpipe", "evaluate", stage="evaluate", variant="student",
                       params={"width": 4}) as run:  # fmt: skip
            log_results(run.info.run_id, {"f1_macro": 0.5}, [report])
        run_id = run.info.run_id
        # A run written straight to the store (as with the server down) shows through it too.
        direct = mlflow.MlflowClient(tracking_uri=mlflow_store()[0])
        offline = direct.create_run(run.info.experiment_id, run_name="offline").info.run_id
        assert mlflow.MlflowClient(tracking_uri=urls["mlflow"]).get_run(offline)
    finally:
        mlflow.set_tracking_uri(previous)

    with sqlite3.connect(root / "mlflow.db") as db:
        assert db.execute(
            "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'f1_macro'", (run_id,)
        ).fetchall() == [(0.5,)]
    [stored] = (root / "mlruns").rglob(f"{run_id}/artifacts/report.txt")
    assert stored.read_text() == "hello"
    # The UI lists and serves it from there (it reads the artifact store itself).
    listing = f"{urls['mlflow']}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}"
    with urllib.request.urlopen(listing, timeout=10) as response:
        assert [f["path"] for f in json.loads(response.read())["files"]] == ["report.txt"]
    with urllib.request.urlopen(
        f"{urls['mlflow']}/get-artifact?path=report.txt&run_uuid={run_id}", timeout=10
    ) as response:
        assert response.read() == b"hello"


def test_a_server_for_another_store_is_neither_used_nor_reused(servers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another checkout, same VISIONPIPE_HOME
    assert tracking_uri() == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    with pytest.raises(RuntimeError, match="visionpipe down"):
        start_mlflow_server(root=tmp_path)


def test_down_refuses_while_a_stage_of_another_checkout_uses_the_server(
    servers, tmp_path, capsys, monkeypatch
):
    urls, _ = servers
    elsewhere = tmp_path / "other-checkout"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with lease(stage="train"):  # this test process stands in for a running train stage
        assert main(["down"]) == 1
        err = capsys.readouterr().err
        assert f"'train' of {elsewhere} (pid {os.getpid()})" in err
        assert "--force" in err
        assert main(["down", "--all", "--under", str(state_dir().parent)]) == 1
        assert f"'train' of {elsewhere}" in capsys.readouterr().err
        assert healthy(urls["prefect_api"]) and healthy(urls["mlflow"])  # nothing stopped
    assert not (state_dir() / "leases" / str(os.getpid())).exists()


def test_down_stops_exactly_the_recorded_processes(servers, capsys):
    urls, pids = servers
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert main(["down"]) == 0
        out = capsys.readouterr().out
        assert f"MLflow server {urls['mlflow']} (pid {pids['mlflow']}" in out
        assert f"Prefect server {urls['prefect_api']} (pid {pids['prefect']}" in out
        assert all(_gone(pid) for pid in pids.values())
        assert bystander.poll() is None
        assert mlflow_server_url() is None
        assert tracking_uri() == mlflow_store()[0]  # the pipeline goes on without it

        assert main(["down"]) == 0
        assert "nothing to stop" in capsys.readouterr().out
        assert down() == []
    finally:
        bystander.kill()
        bystander.wait()


# --- No servers needed ---


def test_stale_records_are_removed_without_signalling_anyone(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write_stale_records(tmp_path)
    assert tracking_uri() == mlflow_store()[0]
    assert down() == []
    assert not (tmp_path / "mlflow/server.json").exists()
    assert not (tmp_path / "prefect/server.json").exists()


def test_a_watcher_whose_checkout_was_removed_leaves_nothing_behind(tmp_path):
    """A stage's idle watcher that wakes after its checkout's state folder was deleted
    (a benchmark's scratch copy) stops nothing and does not recreate the folder."""
    gone = tmp_path / "copy" / ".visionpipe" / "prefect"
    assert stop_when_idle(gone, idle=0.0) is False
    assert not (tmp_path / "copy").exists()


def test_a_reused_pid_is_not_killed(tmp_path, monkeypatch):
    # The recorded pid now leads another session: the start time recorded with it differs.
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path))
        (tmp_path / "mlflow").mkdir()
        record = {"pid": stranger.pid, "pid_start": 1, "url": f"http://127.0.0.1:{free_port()}"}
        (tmp_path / "mlflow/server.json").write_text(json.dumps(record))
        assert not stop_mlflow_server()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_prefect_record_whose_pid_was_reused_never_signals_the_new_owner(tmp_path):
    # A server killed rather than stopped leaves its record; its PID may since belong to
    # anything (another checkout's server, say): the start time tells, and it is spared.
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "prefect").mkdir()
        record = {"pid": stranger.pid, "pid_start": 1.0, "api_url": "http://127.0.0.1:1/api"}
        (tmp_path / "prefect" / "server.json").write_text(json.dumps(record))
        assert not stop_local_server(tmp_path / "prefect")
        assert stranger.poll() is None
        assert read_state(tmp_path / "prefect") is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_server_that_does_not_come_up_is_killed_and_its_log_shown(tmp_path):
    with pytest.raises(RuntimeError, match="did not answer within") as error:
        start_mlflow_server(tmp_path / "state", root=tmp_path, timeout=0.5)
    assert str(tmp_path / "state/server.log") in str(error.value)
    assert read_state(tmp_path / "state") is None
    # nothing of it is left running
    assert not [
        process.info["cmdline"]
        for process in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(process.info["cmdline"] or [])
    ]
