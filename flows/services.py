"""Local Prefect and MLflow servers for browsing runs: ``visionpipe up`` / ``visionpipe down``.

``up`` starts (or reuses) two servers on 127.0.0.1, each in its own session
so it outlives the command, and returns their URLs once both answer /health:

- the Prefect server the stages would otherwise start on first use
  (``flows/prefect_api.py``), state in ``$VISIONPIPE_HOME/prefect/``;
- an MLflow tracking server in front of the very store the stages write to
  without one (``mlflow.db`` and ``mlruns/`` at the repository root, see
  ``tasks/tracking.py``), state in ``$VISIONPIPE_HOME/mlflow/``. Runs
  recorded before ``up`` show in its UI, and stages run while it is up
  report to it (``tracking_uri()`` finds it); when it is down they write to
  the same store directly, so nothing depends on it being up.

Each state folder holds ``server.json`` (pid, port, URL) and ``server.log``.
``down`` stops exactly the recorded process groups, nothing else listening.

The MLflow command line, and why::

    python -m mlflow server --host 127.0.0.1 --port N --workers 1
        --backend-store-uri sqlite:///<root>/mlflow.db
        --default-artifact-root file://<root>/mlruns --no-serve-artifacts

``--no-serve-artifacts``: the experiments' artifact locations are local paths
under ``mlruns/`` (``use_experiment`` sets them), so the client writes
artifacts straight to disk exactly as it does with no server, and the server
reads them from there for the UI. Serving would only add an upload endpoint
writing to ``./mlartifacts``, which no experiment here points at, and a
server bound to 127.0.0.1 has no remote clients to need it.
``--workers 1``: MLflow 3 runs uvicorn with 4 workers by default, too many
for a 2-core machine serving one user. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION
=false``: MLflow 3 otherwise also starts a job runner and seven huey
consumers (for GenAI scorers this pipeline never uses), doubling startup
to about 12 s. The default security middleware (localhost hosts and CORS
origins only) is kept: the UI is opened at 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.prefect_api import (
    free_port,
    healthy,
    home,
    local_server_url,
    locked,
    read_state,
    spawn_server,
    start_local_server,
    state_dir,
    stop_server,
)

MLFLOW_STARTUP_TIMEOUT_ENV = "VISIONPIPE_MLFLOW_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT_S = 120.0


def mlflow_state_dir() -> Path:
    """MLflow server state: ``$VISIONPIPE_HOME/mlflow`` (``tasks/tracking.py`` reads it too)."""
    return home() / "mlflow"


def mlflow_store(root: Path | None = None) -> tuple[str, str]:
    """The backend store URI and artifact root the stages use without a server, for ``root``."""
    root = root or Path.cwd()  # the same expressions as tasks/tracking.py, so URIs compare equal
    return f"sqlite:///{(root / 'mlflow.db').resolve()}", (root / "mlruns").resolve().as_uri()


def mlflow_server_url(directory: Path | None = None) -> str | None:
    """The URL of the MLflow server ``up`` recorded, if it answers /health."""
    state = read_state(directory or mlflow_state_dir())
    if state and healthy(state.get("url", "")):
        return state["url"]
    return None


def start_mlflow_server(
    directory: Path | None = None, root: Path | None = None, timeout: float | None = None
) -> str:
    """Start (or reuse) the MLflow server for ``root``'s store; its URL once it answers /health.

    A healthy recorded server in front of another store is an error rather
    than something to reuse or replace: the caller would browse the wrong runs.
    """
    directory = directory or mlflow_state_dir()
    root = (root or Path.cwd()).resolve()
    store, artifacts = mlflow_store(root)
    timeout = timeout or float(
        os.environ.get(MLFLOW_STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S)
    )
    with locked(directory):
        if url := mlflow_server_url(directory):
            serving = (read_state(directory) or {}).get("backend_store_uri")
            if serving != store:
                raise RuntimeError(
                    f"the MLflow server on {url} (state in {directory}) serves {serving}, "
                    f"not {store}: stop it with `visionpipe down` first"
                )
            return url
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "MLFLOW_DISABLE_TELEMETRY": "true",  # a default, like Prefect's analytics: no network
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # see the module docstring
        }
        spawn_server(
            directory,
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", store,
             "--default-artifact-root", artifacts, "--no-serve-artifacts"],
            url,
            env=env,
            timeout=timeout,
            what="MLflow server",
            hint=f"raise {MLFLOW_STARTUP_TIMEOUT_ENV} on a slow machine",
            record={"port": port, "url": url, "backend_store_uri": store,
                    "artifact_root": artifacts},
            cwd=root,
        )  # fmt: skip
        return url


def stop_mlflow_server(directory: Path | None = None) -> bool:
    """Stop the MLflow server this state dir records; False when none was running."""
    return stop_server(directory or mlflow_state_dir()) is not None


def up(root: Path | None = None, timeout: float | None = None) -> dict[str, str]:
    """Start (or reuse) both servers; their URLs: ``prefect_ui``, ``prefect_api``, ``mlflow``.

    Both start at once: each spends most of its ~5-10 s importing, and
    the two overlap well even on two cores. If either fails, the one this
    call started is stopped again, so ``up`` leaves all or nothing new
    behind, and RuntimeError says what failed with its log's tail.
    """
    already = {
        "prefect": local_server_url() is not None,
        "mlflow": mlflow_server_url() is not None,
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        prefect = pool.submit(start_local_server, None, timeout)
        mlflow = pool.submit(start_mlflow_server, None, root, timeout)
    errors = [error for error in (prefect.exception(), mlflow.exception()) if error]
    if errors:
        if prefect.exception() is None and not already["prefect"]:
            stop_server(state_dir())
        if mlflow.exception() is None and not already["mlflow"]:
            stop_server(mlflow_state_dir())
        raise RuntimeError("\n\n".join(str(error) for error in errors)) from errors[0]
    api_url = prefect.result()
    return {
        "prefect_ui": api_url.removesuffix("/api"),
        "prefect_api": api_url,
        "mlflow": mlflow.result(),
    }


def down() -> list[str]:
    """Stop both recorded servers; one line per server that was running, for the CLI.

    Both at once: each takes 2-3 s to shut down gracefully.
    """
    servers = (
        ("Prefect server", state_dir(), "api_url"),
        ("MLflow server", mlflow_state_dir(), "url"),
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        states = list(pool.map(stop_server, [directory for _, directory, _ in servers]))
    return [
        f"{what} {state.get(key)} (pid {state['pid']}, state in {directory})"
        for (what, directory, key), state in zip(servers, states, strict=True)
        if state is not None
    ]
