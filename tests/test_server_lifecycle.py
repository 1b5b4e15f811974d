"""No server outlives its reason to exist: real Prefect servers, real DVC experiments.

- ``dvc exp run --temp`` runs its stages in a temporary copy that DVC deletes
  afterwards; they share the one local Prefect server of the user (here: of
  ``VISIONPIPE_HOME``) instead of starting their own in the copy, and that
  server stops by itself once no stage has used it for
  ``VISIONPIPE_PREFECT_IDLE_S``;
- a server whose state folder is gone (what older versions left behind in
  deleted copies) is listed by ``visionpipe status`` and stopped by
  ``visionpipe down --all``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.workspace import copy_env, fresh_copy, git
from tasks.servers import down_all, read_state, servers_on_machine, start_local_server
from tests.tinyrepo import TINY, set_params

pytestmark = pytest.mark.slow
IDLE_S = 8


def _env(state: Path, idle: float) -> dict[str, str]:
    return copy_env(state, VISIONPIPE_PREFECT_IDLE_S=str(idle))


def _run(cwd: Path, env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _mine(base: Path) -> list:
    return [s for s in servers_on_machine() if s.state.startswith(str(base))]


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def test_a_temporary_experiment_shares_one_server_that_then_stops_by_itself(tmp_path) -> None:
    repo = fresh_copy(tmp_path / "repo")
    set_params(repo, TINY)
    git(repo, "rm", "-q", "dvc.lock")  # its outputs are not in this copy's cache
    git(repo, "commit", "-qam", "tiny params, nothing run yet")
    state = tmp_path / "state"
    env = _env(state, IDLE_S)

    out = _run(repo, env, sys.executable, "-m", "dvc", "exp", "run", "--temp", "prepare",
               "-S", "data.val_fraction=0.2")  # fmt: skip
    assert "Prefect API http://127.0.0.1:" in out
    temporary = repo / ".dvc" / "tmp" / "exps"
    servers = _mine(tmp_path)
    # One server, the shared one: none was started in (or left in) the deleted copy.
    assert len(servers) <= 1, servers
    assert all(s.state == str(state / "prefect") for s in servers), servers
    assert not any(str(temporary) in s.state or str(temporary) in s.cwd for s in servers)

    assert _wait_until(lambda: not _mine(tmp_path), timeout=IDLE_S + 60), _mine(tmp_path)
    assert read_state(state / "prefect") is None  # its record went with it
    log = (state / "prefect" / "server.log").read_text()
    assert "no stage has used this server for 8 s" in log


def test_status_lists_a_server_whose_checkout_is_gone_and_down_all_stops_it(
    tmp_path, monkeypatch
) -> None:
    gone = tmp_path / "deleted-copy" / ".visionpipe" / "prefect"
    monkeypatch.setenv("VISIONPIPE_PREFECT_IDLE_S", "0")  # never stops by itself
    start_local_server(gone)
    (server,) = _mine(tmp_path)
    shutil.rmtree(tmp_path / "deleted-copy")
    env = _env(tmp_path / "elsewhere", 0)

    status = _run(tmp_path, env, sys.executable, "-m", "flows.cli", "status")
    assert f"Prefect server {server.url} (pid {server.pid}" in status
    assert "checkout gone" in status and "down --all" in status

    # --under: this machine's other visionpipe servers (a user's pipeline) are not this test's
    down = _run(tmp_path, env, sys.executable, "-m", "flows.cli", "down", "--all", "--under",
                str(tmp_path))  # fmt: skip
    assert f"stopped the Prefect server {server.url} (pid {server.pid}" in down
    assert _wait_until(lambda: not _mine(tmp_path), timeout=30)
    os.waitpid(server.pid, 0)  # this process started it: reap it, or it lingers as a zombie
    assert not psutil.pid_exists(server.pid)


@pytest.mark.parametrize("when", ["finished", "unfinished"])
def test_a_stage_outlives_its_prefect_server(tmp_path, when: str) -> None:
    """The real local server killed mid-stage: finished work is recorded (exit 0, metrics
    say the run was not reported); unfinished work fails fast, naming the API and the fix."""
    root = Path(__file__).resolve().parents[1]
    env = _env(tmp_path / "state", 0)
    env["PYTHONPATH"] = str(root)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "tests.api_loss_stage", str(tmp_path / "state" / "prefect"),
             when],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        down_all(tmp_path)  # the stage kills its server; this catches one it did not
    ended = time.time()
    killed = float(process.stdout.split("server killed at ")[1].split()[0])
    assert ended - killed < 60, (ended - killed, process.stdout[-3000:], process.stderr[-3000:])
    url = process.stdout.split("visionpipe: Prefect API ")[1].split()[0]
    metrics = tmp_path / "metrics" / "prepare.json"
    if when == "finished":
        assert process.returncode == 0, process.stderr[-3000:]
        assert f"the Prefect API {url} stopped answering" in process.stderr
        record = json.loads(metrics.read_text())
        assert record["images"] == 3 and record["prefect_reported"] is False
    else:
        assert process.returncode == 1, process.stderr[-3000:]
        assert f"the Prefect API {url} stopped answering during 'prepare'" in process.stderr
        assert "`visionpipe up`" in process.stderr
        assert not metrics.exists()


def test_a_stage_whose_mlflow_server_dies_fails_fast_and_its_run_is_closed_later(
    tmp_path, monkeypatch
) -> None:
    import mlflow

    from tasks.servers import start_mlflow_server
    from tasks.tracking import ABANDONED_TAG, close_abandoned_runs

    root = Path(__file__).resolve().parents[1]
    state = tmp_path / "state"
    url = start_mlflow_server(state / "mlflow", tmp_path)
    env = _env(state, 0)
    env["PYTHONPATH"] = str(root)
    env["MLFLOW_TRACKING_URI"] = url
    try:
        process = subprocess.run(
            [sys.executable, "-m", "tests.api_loss_stage", str(state / "mlflow"), "mlflow"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        down_all(tmp_path)  # the Prefect server the stage started (idle 0: it would stay up)
    ended = time.time()
    killed = float(process.stdout.split("server killed at ")[1].split()[0])
    assert process.returncode == 1, process.stderr[-3000:]
    assert ended - killed < 60, (ended - killed, process.stderr[-3000:])
    assert f"the MLflow tracking server {url} stopped answering during 'train'" in process.stderr
    assert "`visionpipe up`" in process.stderr

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # what the server was in front of
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    try:
        (run,) = mlflow.search_runs(experiment_names=["api-loss"], output_format="list")
        assert run.info.status == "RUNNING"  # the dead server could not be told
        assert close_abandoned_runs(run.info.experiment_id) == [run.info.run_id]
        closed = mlflow.get_run(run.info.run_id)
        assert closed.info.status == "FAILED" and ABANDONED_TAG in closed.data.tags
    finally:
        mlflow.set_tracking_uri(None)
