"""The MLflow and Prefect web UIs, looked at in a real headless Chromium.

Starts a real ``mlflow server`` and a real ``prefect server start``, logs three
hand-made runs and two tiny flows to them, then checks with ``tests/ui.py``
that MLflow's run-comparison page shows the runs and their metric values and
that Prefect's run list shows the flows. Skipped without Chromium unless
``VISIONPIPE_REQUIRE_CHROMIUM=1``. Run alone: ``pytest tests/test_ui.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.ui import chromium_or_skip, mlflow_compare_page, mlflow_ui_number, prefect_flow_runs_page

pytestmark = pytest.mark.browser

STARTUP_TIMEOUT_S = 120  # both servers import a lot; two shared cores make that slow
# Distinct values that exercise each of the UI's number formats.
RUNS = {
    "teacher": {"f1_macro": 0.9312, "size_bytes": 2_345_678, "latency_ms_b1": 12.3456},
    "student": {"f1_macro": 0.8876, "size_bytes": 456_789, "latency_ms_b1": 3.21},
    "student_int8": {"f1_macro": 0.8801, "size_bytes": 123_456, "latency_ms_b1": 0.0456},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], env: dict[str, str], log: Path, health: str) -> subprocess.Popen:
    """Start a server in its own process group; return once ``health`` answers 200."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    _stop(process)
    pytest.fail(f"{command[2]} server not healthy at {health}:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """End the server's whole process group (workers and helpers too)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chromium_or_skip()  # before paying for the servers
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--default-artifact-root", str(root / "mlruns"),
    ]  # fmt: skip
    # Without the flag the server also starts a job runner and seven huey consumers (~2 GB).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}"
    process = _start(command, env, root / "server.log", f"{url}/health")
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def prefect_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chromium_or_skip()
    root = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the server where its API is; --port alone makes it answer :4200.
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_SERVER_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    process = _start(command, env, root / "server.log", f"{url}/api/health")
    yield url
    _stop(process)


@task
def _add(a: int, b: int) -> int:
    return a + b


@flow(name="ui-check-prepare")
def _prepare_flow() -> int:
    return _add(1, 2)


@flow(name="ui-check-train")
def _train_flow() -> int:
    return _add(2, 3)


def _log_runs(mlflow_url: str) -> tuple[str, list[str]]:
    from mlflow import MlflowClient  # ~3 s to import: only when the test runs

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment_id = client.create_experiment("ui-check")
    run_ids = []
    for name, metrics in RUNS.items():
        run = client.create_run(experiment_id, run_name=name)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    return experiment_id, run_ids


def test_mlflow_number_format_matches_the_ui() -> None:
    """Golden strings of MLflow 3.17's ``Utils.formatMetric`` (the first six seen on its page)."""
    cases = {
        0.9312: "0.931", 0.8801: "0.88", 12.3456: "12.35", 3.21: "3.21", 0.0456: "0.046",
        2_345_678: "2345678", 123.45: "123.5", 0: "0", 0.000456: "4.560e-4", -0.5: "-0.5",
        0.0005: "5.000e-4", 1e17: "100000000000000000",
    }  # fmt: skip
    assert {value: mlflow_ui_number(value) for value in cases} == cases


def test_mlflow_compare_page_shows_runs_and_metrics(mlflow_url: str, tmp_path: Path) -> None:
    experiment_id, run_ids = _log_runs(mlflow_url)
    screenshot = tmp_path / "mlflow_compare.png"

    text = mlflow_compare_page(mlflow_url, run_ids, experiment_id, screenshot)

    assert "Comparing 3 Runs" in text
    for name in RUNS:
        assert name in text
    table = {
        line.split("\t")[0]: line.split("\t")[1:] for line in text.splitlines() if "\t" in line
    }
    for key in ("f1_macro", "size_bytes", "latency_ms_b1"):
        shown = [mlflow_ui_number(metrics[key]) for metrics in RUNS.values()]
        assert table[key] == shown, key
        assert all(value in text for value in shown)
    assert screenshot.stat().st_size > 10_000


def test_prefect_runs_page_lists_flow_runs(prefect_url: str, tmp_path: Path) -> None:
    with temporary_settings({PREFECT_API_URL: f"{prefect_url}/api"}):
        assert _prepare_flow() == 3
        assert _train_flow() == 5
    screenshot = tmp_path / "prefect_runs.png"

    text = prefect_flow_runs_page(prefect_url, screenshot)

    assert "ui-check-prepare" in text
    assert "ui-check-train" in text
    assert "Completed" in text
    assert screenshot.stat().st_size > 10_000
