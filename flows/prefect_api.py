"""How a stage process reaches a Prefect API, and the one way every stage runs.

Prefect needs an API to record flow and task runs. In order of preference:

1. ``PREFECT_API_URL`` is set: use it as is (a team's server, Prefect Cloud, or
   your own ``prefect server start``).
2. Otherwise visionpipe starts a real local ``prefect server start`` on
   127.0.0.1 the first time a stage needs one, in the background, with its own
   database under ``.visionpipe/prefect/``, and every later stage (and later
   ``dvc repro``) reuses it. ``visionpipe down`` stops it; its UI is at the URL
   the stage prints.
3. ``VISIONPIPE_PREFECT=ephemeral`` falls back to Prefect's own per-process
   ephemeral server.

Why not 3 by default: the ephemeral server starts inside every stage process
and costs about 10 s per stage on a 2-core machine (ENVIRONMENT.md), six times
per ``dvc repro``; a server started once costs that once, then about 2 s of
API traffic per stage (``benchmarks/prefect_overhead.py`` measures both).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tasks.params import ParamsError, load_params

T = TypeVar("T")
STATE_DIR_ENV = "VISIONPIPE_HOME"
MODE_ENV = "VISIONPIPE_PREFECT"
STARTUP_TIMEOUT_ENV = "VISIONPIPE_PREFECT_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT_S = 120.0


def state_dir() -> Path:
    """Local server state: ``$VISIONPIPE_HOME/prefect`` (default ``./.visionpipe/prefect``)."""
    return Path(os.environ.get(STATE_DIR_ENV, ".visionpipe")).resolve() / "prefect"


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise start/stop across processes (two stages must not start two servers)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_server_url(directory: Path | None = None) -> str | None:
    """The API URL of the local server visionpipe started, if it is up."""
    state = _read_state(directory or state_dir())
    if state and _healthy(state["api_url"]):
        return state["api_url"]
    return None


def start_local_server(directory: Path | None = None, timeout: float | None = None) -> str:
    """Start (or reuse) the local Prefect server; return its API URL once it answers /health."""
    directory = directory or state_dir()
    timeout = timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S))
    with _locked(directory):
        if url := local_server_url(directory):
            return url
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": str(directory / "home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": api_url,
        }
        log_path = directory / "server.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start",
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # outlives this stage; stopped by `visionpipe down`
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if process.poll() is not None or time.monotonic() > deadline:
                _kill_group(process.pid)
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"the local Prefect server did not come up on {api_url} within {timeout:.0f} s "
                    f"(raise {STARTUP_TIMEOUT_ENV} on a slow machine, or set PREFECT_API_URL). "
                    f"Last lines of {log_path}:\n{tail}"
                )
            time.sleep(0.25)
        state = {"pid": process.pid, "port": port, "api_url": api_url, "started": time.time()}
        (directory / "server.json").write_text(json.dumps(state))
        return api_url


def _kill_group(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
            os.killpg(pid, 0)  # raises ProcessLookupError once the group is gone
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


def stop_local_server(directory: Path | None = None) -> bool:
    """Stop the local server this state dir records; False when none was recorded."""
    directory = directory or state_dir()
    with _locked(directory):
        state = _read_state(directory)
        if state is None:
            return False
        _kill_group(int(state["pid"]))
        (directory / "server.json").unlink(missing_ok=True)
        return True


def resolve_api_url() -> str | None:
    """The Prefect API this process should use; None means Prefect's ephemeral mode."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    if os.environ.get(MODE_ENV, "local").lower() == "ephemeral":
        return None
    return start_local_server()


def run_stage(flow: Callable[..., T], **parameters: Any) -> T:
    """Run a stage's flow against the resolved Prefect API; exit 2 on bad params."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = resolve_api_url()
    if api_url:
        print(f"visionpipe: Prefect API {api_url} (UI: {api_url.removesuffix('/api')})", flush=True)
    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates):
        return flow(**parameters)


def stage_main(flow: Any, worker: Callable[..., Any] | None = None) -> Any:
    """Entry point of ``python -m flows.<stage>``: validate params, then run the flow.

    The flow's parameters are named after the params.yaml sections it reads
    (``seed``, ``data``, ``train``, ...), so each gets exactly those and no
    more. A bad value anywhere in params.yaml stops here, before any server
    starts or data is touched.

    Under ``torchrun`` only rank 0 runs the Prefect flow (and so talks to
    Prefect and MLflow and writes outputs); the other ranks call ``worker``
    with the same sections: the same fits as plain functions, joining rank 0's
    collectives. A stage without a ``worker`` has nothing to share out.
    """
    try:
        params = load_params()
    except ParamsError as exc:
        print(f"visionpipe: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sections = {name: getattr(params, name) for name in flow_sections(flow)}
    if int(os.environ.get("RANK", "0")) > 0:  # set by torchrun (tasks/distributed.py)
        return worker(**sections) if worker is not None else None
    return run_stage(flow, **sections)


def flow_sections(flow: Any) -> tuple[str, ...]:
    """The params.yaml sections a stage's flow reads: its parameter names."""
    return tuple(inspect.signature(flow.fn).parameters)
