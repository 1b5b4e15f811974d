"""How a stage process reaches a Prefect API, and the one way every stage runs.

Prefect needs an API to record flow and task runs. In order of preference:

1. ``PREFECT_API_URL`` is set: use it as is (a team's server, Prefect Cloud, or
   your own ``prefect server start``).
2. Otherwise visionpipe starts a real local ``prefect server start`` on
   127.0.0.1 the first time a stage needs one (or at ``visionpipe up``), in the
   background, with its own database, and every later stage (and later ``dvc
   repro``) reuses it. There is one such server per user, not per checkout
   (state in ``~/.local/state/visionpipe/prefect/``, or
   ``$VISIONPIPE_HOME/prefect/`` when that is set), so the temporary copies
   of ``dvc exp run --temp`` and of the experiment queue share it instead of
   each leaving its own behind. A server a stage started stops by itself once
   no stage has used it for ``$VISIONPIPE_PREFECT_IDLE_S`` seconds (default
   300; 0: never): each stage holds a lease on it while it runs
   (``flows/idle_server.py`` watches them). One started by ``visionpipe up``
   (or any caller of ``start_local_server`` other than a stage) stays up
   until ``visionpipe down``. ``visionpipe status`` lists every
   visionpipe server on the machine, ``visionpipe down --all`` stops them all,
   also those whose checkout is gone; its UI is at the URL the stage prints.
3. ``VISIONPIPE_PREFECT=ephemeral`` falls back to Prefect's own per-process
   ephemeral server.

Why not 3 by default: the ephemeral server starts inside every stage process
and costs about 10 s per stage on a 2-core machine, six times
per ``dvc repro``; a server started once costs that once, then about 2 s of
API traffic per stage (``benchmarks/prefect_overhead.py`` measures both).

The machinery for such a local server (spawn it detached, wait for /health,
record pid and URL in ``server.json``, stop exactly that process group) lives
here too, and ``flows/services.py`` reuses it for the local MLflow server
(``visionpipe up``). Not the other way round: every stage imports this
module, so whatever it imports becomes a code dependency of every stage in
``dvc.yaml`` (tests/test_dvc_yaml.py), and how servers start changes no output.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil
from filelock import FileLock

from tasks.params import ParamsError, load_params

T = TypeVar("T")
STATE_DIR_ENV = "VISIONPIPE_HOME"
MODE_ENV = "VISIONPIPE_PREFECT"
STARTUP_TIMEOUT_ENV = "VISIONPIPE_PREFECT_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT_S = 120.0


IDLE_ENV = "VISIONPIPE_PREFECT_IDLE_S"
DEFAULT_IDLE_S = 300.0
SERVER_MARK_ENV = "VISIONPIPE_SERVER"  # in every server's environment: how `status` finds them


def home() -> Path:
    """Where a checkout's local state lives: ``$VISIONPIPE_HOME`` (default ``./.visionpipe``)."""
    return Path(os.environ.get(STATE_DIR_ENV, ".visionpipe")).resolve()


def state_dir() -> Path:
    """The shared local Prefect server's state: ``$VISIONPIPE_HOME/prefect`` when that is
    set, else per user, ``$XDG_STATE_HOME/visionpipe/prefect`` (``~/.local/state/...``)."""
    if os.environ.get(STATE_DIR_ENV):
        return home() / "prefect"
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).resolve() / "visionpipe" / "prefect"


def idle_seconds() -> float:
    """``$VISIONPIPE_PREFECT_IDLE_S``: how long a stage-started server waits unused (0: ever)."""
    raw = os.environ.get(IDLE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise ValueError(f"{IDLE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{IDLE_ENV}={raw!r} must be at least 0")
    return value


def local_server_url(directory: Path | None = None) -> str | None:
    """The API URL of the local server visionpipe started, if it is up."""
    state = read_state(directory or state_dir())
    if state and healthy(state.get("api_url", "")):
        return state["api_url"]
    return None


def start_local_server(
    directory: Path | None = None, timeout: float | None = None, *, stop_when_idle: bool = False
) -> str:
    """Start (or reuse) the local Prefect server; return its API URL once it answers /health.

    With ``stop_when_idle`` (a stage needing an API: ``resolve_api_url``) a new
    server stops itself after ``idle_seconds()`` without a stage's lease.
    Without it (``visionpipe up``, a script or test that then points
    ``PREFECT_API_URL`` at it) the server stays up until stopped, a running
    one included: its state folder gets a ``keep`` file, which
    ``stop_local_server`` and ``visionpipe down`` remove.
    """
    directory = directory or state_dir()
    timeout = timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S))
    idle = idle_seconds() if stop_when_idle else 0.0
    with locked(directory):
        if not stop_when_idle:
            (directory / "keep").touch()
        if url := local_server_url(directory):
            return url
        if stop_when_idle:  # a keep file of an earlier server that was killed, not stopped
            (directory / "keep").unlink(missing_ok=True)
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        checkout = str(Path(__file__).resolve().parents[1])  # flows.idle_server's package
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])),
            "PREFECT_HOME": str(directory / "home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": api_url,
        }
        spawn_server(
            directory,
            [sys.executable, "-m", "flows.idle_server", "--state", str(directory),
             "--idle", str(idle), "--",
             sys.executable, "-m", "prefect", "server", "start",
             "--host", "127.0.0.1", "--port", str(port)],
            api_url,
            env=env,
            timeout=timeout,
            what="Prefect server",
            hint=f"raise {STARTUP_TIMEOUT_ENV} on a slow machine, or set PREFECT_API_URL",
            record={"port": port, "api_url": api_url, "idle_s": idle},
            cwd=directory,  # not the checkout: a temporary copy's folder is deleted under it
        )  # fmt: skip
        return api_url


def stop_local_server(directory: Path | None = None) -> bool:
    """Stop the local server this state dir records; False when none was running."""
    directory = directory or state_dir()
    stopped = stop_server(directory) is not None
    (directory / "keep").unlink(missing_ok=True)
    return stopped


# --- Local servers in general: the Prefect server here, the MLflow one in flows/services.py ---


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url``/health answers 200 (Prefect's API and MLflow's server both have one)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_state(directory: Path) -> dict[str, Any] | None:
    """The record ``spawn_server`` wrote in ``directory``, None if absent or unreadable."""
    try:
        state = json.loads((directory / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "pid" in state else None


def locked(directory: Path) -> FileLock:
    """Serialise start/stop across processes (two stages must not start two servers)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(directory / "lock")


def spawn_server(
    directory: Path,
    command: list[str],
    url: str,
    *,
    env: Mapping[str, str],
    timeout: float,
    what: str,
    hint: str,
    record: Mapping[str, Any],
    cwd: Path | None = None,
) -> None:
    """Start ``command`` detached, wait until ``url``/health answers, record it in server.json.

    Call it holding ``locked(directory)``. The server runs in its own session,
    so it outlives the process that started it and ``stop_server`` can end
    its whole process group (servers fork workers). Output goes to
    ``directory/server.log``. If it exits or does not answer within
    ``timeout`` seconds, its group is killed and RuntimeError carries what it
    logged.
    """
    log_path = directory / "server.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    env = {**env, SERVER_MARK_ENV: json.dumps({"what": what, "state": str(directory), "url": url})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not healthy(url):
        status = process.poll()
        if status is not None or time.monotonic() > deadline:
            kill_group(process.pid)
            why = f"exited with status {status}" if status is not None else (
                f"did not answer within {timeout:.0f} s"
            )  # fmt: skip
            with open(log_path, "rb") as log:
                log.seek(offset)
                tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(
                f"the local {what} on {url} {why} ({hint}). Last lines of {log_path}:\n{tail}"
            )
        time.sleep(0.25)
    state = {"pid": process.pid, "pid_start": started_at(process.pid), **record}
    state["started"] = time.time()
    # Readers (every stage) never lock: replace the file whole so they never see half of it.
    scratch = directory / "server.json.tmp"
    scratch.write_text(json.dumps(state))
    scratch.replace(directory / "server.json")


def stop_server(directory: Path) -> dict[str, Any] | None:
    """Stop the server recorded in ``directory``; its record, or None when none was running.

    Only the recorded process group is signalled, and only if it is still the
    process that was recorded: a stale record (the server died, the machine
    rebooted, its pid now belongs to something else) is removed untouched.
    """
    with locked(directory):
        state = read_state(directory)
        if state is None:
            return None
        running = is_running(state)
        if running:
            kill_group(int(state["pid"]))
        (directory / "server.json").unlink(missing_ok=True)
        return state if running else None


def is_running(state: Mapping[str, Any]) -> bool:
    """Whether the process group ``spawn_server`` recorded still exists and is that server."""
    pid = int(state["pid"])
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A group with this id exists. If its leader's start time differs from the recorded one,
    # the pid was reused by a new session leader; records without one predate the check.
    recorded, current = state.get("pid_start"), started_at(pid)
    return recorded is None or current is None or recorded == current


def started_at(pid: int) -> float | None:
    """When ``pid`` started (psutil's create time, epoch seconds); None if it is gone.

    With the pid it names one process for good: a pid reused later has a later start."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def kill_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads, SIGKILL it if still there after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
            os.killpg(pid, 0)  # raises ProcessLookupError once the group is gone
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


# --- How a stage runs ---


def resolve_api_url() -> str | None:
    """The Prefect API this process should use; None means Prefect's ephemeral mode."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    if os.environ.get(MODE_ENV, "local").lower() == "ephemeral":
        return None
    return start_local_server(stop_when_idle=True)


def uses_local_server() -> bool:
    """Whether this process reaches Prefect through the local server visionpipe starts
    (also when ``PREFECT_API_URL`` is set to that very server's URL)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return (read_state(state_dir()) or {}).get("api_url") == url
    return os.environ.get(MODE_ENV, "local").lower() != "ephemeral"


@contextlib.contextmanager
def lease(directory: Path | None = None, stage: str = "a visionpipe command") -> Iterator[None]:
    """Mark this process as a user of the local server until the block ends.

    A file ``leases/<pid>`` saying who holds it (pid, start time, checkout,
    stage); the server's idle watch (``flows/idle_server.py``) does not stop it
    while a live process holds one, ``visionpipe down`` names them and stops
    it only with ``--force``, and both drop those of processes that died
    without letting go.
    """
    leases = (directory or state_dir()) / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    path = leases / str(os.getpid())
    record = {"pid": os.getpid(), "started": started_at(os.getpid()),
              "checkout": str(Path.cwd()), "stage": stage}  # fmt: skip
    scratch = path.with_suffix(".tmp")  # never read half-written
    scratch.write_text(json.dumps(record))
    scratch.replace(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def live_leases(directory: Path) -> list[dict[str, Any]]:
    """Who holds a lease on ``directory``'s server (pid, checkout, stage), oldest pid first;
    the leases of processes that have ended are removed."""
    alive = []
    for path in (directory / "leases").glob("*"):
        if not path.name.isdigit():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or not ours
        if not isinstance(record, dict) or "pid" not in record:
            continue
        current = started_at(int(record["pid"]))
        if current is not None and record.get("started") in (None, current):
            alive.append(record)
        else:
            path.unlink(missing_ok=True)
    return sorted(alive, key=lambda record: record["pid"])


# A stage's Prefect client gives up on an unreachable API after this many retries of
# a request, each waiting at most this long, instead of Prefect's 5 x 60 s: a stage
# whose API died goes on with its work (task states that cannot be reported are
# logged and skipped) and ends within seconds of its last step, not minutes.
STAGE_CLIENT_RETRIES = 2
STAGE_REQUEST_TIMEOUT_S = 30.0
# The same for a stage's MLflow client (MLflow's own defaults: 7 retries, backoff
# factor 2, 120 s per request, minutes before a dead tracking server is given up on).
STAGE_MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def api_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the Prefect API not answering."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx.TransportError):  # refused, reset, timed out
            return True
        if isinstance(seen, PrefectHTTPStatusError) and seen.response.status_code >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def mlflow_lost(exc: BaseException) -> str | None:
    """The tracking URI, when ``exc`` (or what caused it) is its server not answering.

    MLflow's REST client raises an ``MlflowException`` once its retries of a
    request are spent, raised while handling the transport's own error: a
    ``requests`` connection error or timeout is what tells a dead server apart.
    """
    import requests

    # refused or reset, timed out, or still failing (5xx) after the client's retries
    failures = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, failures):
            import mlflow

            return mlflow.get_tracking_uri()
        seen = seen.__cause__ or seen.__context__
    return None


def _finish_without_api(stage: str, api_url: str, exc: BaseException, started: float) -> None:
    """End a stage whose Prefect API stopped answering; never returns.

    If the flow wrote its metrics file during this run (every stage writes it
    last, after its outputs, each one whole), the work is done: the metrics
    say the run could not be reported and the stage exits 0, so DVC records
    the outputs. Otherwise it exits 1 saying what was lost and what to do.
    Either way through ``os._exit``: Prefect's log shipper would otherwise
    retry the dead API for minutes at interpreter exit.
    """
    from tasks.artifacts import read_json, write_json
    from tasks.layout import metrics_path

    metrics = metrics_path(stage)
    reason = f"{type(exc).__name__}: {exc}"
    if metrics.is_file() and metrics.stat().st_mtime >= started:
        record = read_json(metrics)
        record["prefect_reported"] = False
        record["prefect_error"] = f"the Prefect API {api_url} stopped answering: {reason}"
        write_json(metrics, record)
        print(
            f"visionpipe: WARNING: the Prefect API {api_url} stopped answering during "
            f"'{stage}' ({reason}). The stage finished and its outputs are whole; its flow "
            f"run could not be reported (recorded in {metrics}: prefect_reported false).",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(0)
    print(
        f"visionpipe: the Prefect API {api_url} stopped answering during '{stage}' "
        f"({reason}), before the stage had finished; none of its outputs were recorded. "
        "Start a server (`visionpipe up`, or point PREFECT_API_URL at yours) and run "
        "`dvc repro` again: train and distill resume from their last finished epoch.",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def run_stage(flow: Callable[..., T], **parameters: Any) -> T:
    """Run a stage's flow against the resolved Prefect API; exit 2 on bad params.

    With the local server, the stage holds a lease on it from before it is
    looked up until the flow has ended, so its idle watch cannot stop it mid-stage.
    If the API stops answering mid-stage, the stage completes what it can
    (``_finish_without_api``): it exits 0 with its outputs recorded when its
    work was done, else 1 within seconds, naming the API and what to do.
    """
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    with lease(stage=flow.name) if uses_local_server() else contextlib.nullcontext():
        api_url = resolve_api_url()
        if api_url:
            ui = api_url.removesuffix("/api")
            print(f"visionpipe: Prefect API {api_url} (UI: {ui})", flush=True)
        updates: dict[Any, Any] = {PREFECT_API_URL: api_url} if api_url else {}
        if api_url and "PREFECT_CLIENT_MAX_RETRIES" not in os.environ:
            updates[PREFECT_CLIENT_MAX_RETRIES] = STAGE_CLIENT_RETRIES
        if api_url and "PREFECT_API_REQUEST_TIMEOUT" not in os.environ:
            updates[PREFECT_API_REQUEST_TIMEOUT] = STAGE_REQUEST_TIMEOUT_S
        for variable, value in STAGE_MLFLOW_HTTP.items():
            os.environ.setdefault(variable, value)
        started = time.time()
        with temporary_settings(updates=updates):
            try:
                return flow(**parameters)
            except Exception as exc:
                if (tracking := mlflow_lost(exc)) is not None:
                    print(
                        f"visionpipe: the MLflow tracking server {tracking} stopped answering "
                        f"during '{flow.name}' ({type(exc).__name__}); nothing of the stage "
                        "was recorded by DVC. Start it again (`visionpipe up`), or unset "
                        "MLFLOW_TRACKING_URI to track into this checkout's mlflow.db, then "
                        "run `dvc repro` again (its open MLflow run is marked FAILED then).",
                        file=sys.stderr,
                        flush=True,
                    )
                    raise SystemExit(1) from None
                if api_url is None or not api_lost(exc):
                    raise
                _finish_without_api(flow.name, api_url, exc, started)
                raise  # unreachable: _finish_without_api exits


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
    if int(os.environ.get("RANK", "0")) > 0:  # set by torchrun (tasks/training/distributed.py)
        return worker(**sections) if worker is not None else None
    return run_stage(flow, **sections)


def flow_sections(flow: Any) -> tuple[str, ...]:
    """The params.yaml sections a stage's flow reads: its parameter names."""
    return tuple(inspect.signature(flow.fn).parameters)
