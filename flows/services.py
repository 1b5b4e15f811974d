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

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from flows.prefect_api import (
    SERVER_MARK_ENV,
    free_port,
    healthy,
    home,
    kill_group,
    live_leases,
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


class ServerInUse(RuntimeError):
    """``down`` was asked to stop the Prefect server while a running stage uses it."""


def users() -> list[str]:
    """The running stages (and ``serve-deployment``/``deploy`` commands) using the local
    Prefect server, one line each: pid, stage and checkout."""
    return [_describe_lease(record) for record in live_leases(state_dir())]


def _describe_lease(record: dict) -> str:
    return f"'{record.get('stage', '?')}' of {record.get('checkout', '?')} (pid {record['pid']})"


def down(force: bool = False) -> list[str]:
    """Stop both recorded servers; one line per server that was running, for the CLI.

    The Prefect server is shared by every checkout of this user: while a stage
    of any of them holds a lease on it, ``ServerInUse`` names those stages and
    nothing is stopped, unless ``force``. Both stop at once: each takes 2-3 s
    to shut down gracefully.
    """
    if not force and local_server_url() is not None and (using := users()):
        raise ServerInUse(
            "the local Prefect server is in use by " + "; ".join(using) + ". Stopping it "
            "now leaves their flow runs unreported: wait for them, or `visionpipe down --force`"
        )
    servers = (
        ("Prefect server", state_dir(), "api_url"),
        ("MLflow server", mlflow_state_dir(), "url"),
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        states = list(pool.map(stop_server, [directory for _, directory, _ in servers]))
    (state_dir() / "keep").unlink(missing_ok=True)
    return [
        f"{what} {state.get(key)} (pid {state['pid']}, state in {directory})"
        for (what, directory, key), state in zip(servers, states, strict=True)
        if state is not None
    ]


@dataclass(frozen=True)
class RunningServer:
    """A visionpipe server process found on this machine (``servers_on_machine``)."""

    pid: int  # its process group's leader: stop_server and kill_group signal the group
    what: str  # "Prefect server" | "MLflow server"
    url: str
    state: str  # its state folder (server.json, server.log)
    cwd: str  # where it runs; "(deleted)" at the end when that folder is gone
    started: float  # epoch seconds

    @property
    def orphaned(self) -> bool:
        """Whether its state folder is gone (a deleted temporary copy's, say)."""
        return not Path(self.state).is_dir() or self.cwd.endswith("(deleted)")

    def describe(self) -> str:
        age = time.time() - self.started
        where = "checkout gone" if self.orphaned else f"state in {self.state}"
        return f"{self.what} {self.url} (pid {self.pid}, up {age / 60:.0f} min, {where})"


def servers_on_machine() -> list[RunningServer]:
    """Every visionpipe server this user runs, found (with psutil) by the mark
    ``spawn_server`` puts in their environment, also those whose checkout or state
    folder is gone."""
    found = []
    for process in psutil.process_iter(["pid", "environ", "cwd", "create_time", "cmdline"]):
        info, pid = process.info, process.info["pid"]
        try:
            if info["environ"] is None or os.getpgid(pid) != pid:  # children carry the mark too
                continue
        except OSError:
            continue  # gone meanwhile
        variables = info["environ"]
        found_info = _marked(variables) or _unmarked(variables, info["cmdline"] or [])
        if found_info is not None:
            found.append(RunningServer(
                pid, found_info["what"], found_info["url"], found_info["state"],
                info["cwd"] or "", info["create_time"],
            ))  # fmt: skip
    return sorted(found, key=lambda server: server.started)


def _marked(variables: dict[str, str]) -> dict[str, str] | None:
    try:
        return json.loads(variables[SERVER_MARK_ENV])
    except (KeyError, ValueError):
        return None


def _unmarked(variables: dict[str, str], command: list[str]) -> dict[str, str] | None:
    """A Prefect server a stage started before servers carried the mark (in a checkout's
    ``.visionpipe/prefect/``): what ``dvc exp run --temp`` copies used to leave behind."""
    prefect_home = variables.get("PREFECT_HOME", "")
    if not prefect_home.endswith(os.path.join(".visionpipe", "prefect", "home")):
        return None
    if "server" not in command or "start" not in command:
        return None
    url = variables.get("PREFECT_API_URL", "?")
    return {"what": "Prefect server", "url": url, "state": str(Path(prefect_home).parent)}


def down_all(under: Path | None = None, force: bool = False) -> list[str]:
    """Stop every visionpipe server this user runs (whose state folder is below ``under``,
    if given); one line per server stopped. As ``down``: none while a running stage uses a
    Prefect server among them (``ServerInUse`` names it), unless ``force``."""
    servers = [
        server
        for server in servers_on_machine()
        if under is None or Path(server.state).is_relative_to(under.resolve())
    ]
    using = [
        _describe_lease(record)
        for server in servers
        if server.what == "Prefect server" and Path(server.state).is_dir()
        for record in live_leases(Path(server.state))
    ]
    if using and not force:
        raise ServerInUse(
            "a visionpipe Prefect server is in use by " + "; ".join(using) + ": wait for "
            "them, or `visionpipe down --all --force`"
        )
    lines = []
    for server in servers:
        kill_group(server.pid)
        state = Path(server.state)
        record = read_state(state) if state.is_dir() else None
        if record is not None and int(record["pid"]) == server.pid:
            (state / "server.json").unlink(missing_ok=True)
        if server.what == "Prefect server":
            (state / "keep").unlink(missing_ok=True)
        lines.append(server.describe())
    return lines
