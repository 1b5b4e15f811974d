"""Local Prefect and MLflow servers: started once, shared, and stopped on their own lifecycle.

**Prefect.** A real ``prefect server start`` on 127.0.0.1, in a session of
its own with its output in ``server.log``, ``PREFECT_HOME`` in a per-user state
folder (``~/.local/state/visionpipe/prefect/``, or ``$VISIONPIPE_HOME/prefect/``):
one server per user, not per checkout, so the temporary copies of ``dvc exp run
--temp`` and of the experiment queue share it. A stage needing an API starts it
on first use; ``visionpipe up`` starts it to stay up (a ``keep`` file) until
``visionpipe down``. Not ``prefect server start --background``: that mode gives
the server a pipe for its output which nobody reads once the command has
returned, and in Prefect 3.8.8 the server then died as soon as it logged
(creating a scheduled deployment killed it, seen with ``visionpipe deploy``).

**Who uses it.** A running stage holds a *lease*: a file ``leases/<pid>``
naming its pid, start time (psutil), checkout and stage. ``visionpipe down``
will not stop a server a live lease holds (it names the stage and checkout;
``--force`` overrides), and a server a stage started stops once no stage has
used it for ``$VISIONPIPE_PREFECT_IDLE_S`` seconds (default 300; 0: never):
each stage, as it lets go of its lease, leaves behind a small detached
``python -m tasks.servers stop-when-idle`` that waits out the idle period and
then, if nothing took a lease meanwhile, stops it.

**MLflow.** ``visionpipe up`` also starts an MLflow tracking server in front
of the very store the stages write to without one (``mlflow.db`` and
``mlruns/`` at the repository root), state in ``$VISIONPIPE_HOME/mlflow/``;
stages report to it while it is up (``tasks/tracking_store.py`` finds it) and
to the same store directly when it is down. Its command line, and why::

    python -m mlflow server --host 127.0.0.1 --port N --workers 1
        --backend-store-uri sqlite:///<root>/mlflow.db
        --default-artifact-root file://<root>/mlruns --no-serve-artifacts

``--no-serve-artifacts``: the artifact locations are local paths under
``mlruns/``, which the client writes directly, as with no server. ``--workers
1``: MLflow 3 runs 4 uvicorn workers by default, too many for 2 cores serving
one user. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: otherwise MLflow 3 also
starts a job runner and seven huey consumers (for GenAI scorers this pipeline
never uses), doubling its start-up.

Each state folder holds ``server.json`` (pid, start time, port, URL) and
``server.log``. Every server carries a mark in its environment, by which
``visionpipe status`` lists all of this user's visionpipe servers on the
machine (psutil), and ``visionpipe down --all`` stops them, also those whose
checkout is gone. Locks are ``filelock``'s, process facts psutil's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

STATE_DIR_ENV = "VISIONPIPE_HOME"
STARTUP_TIMEOUT_ENV = "VISIONPIPE_PREFECT_STARTUP_TIMEOUT"
MLFLOW_STARTUP_TIMEOUT_ENV = "VISIONPIPE_MLFLOW_STARTUP_TIMEOUT"
DEFAULT_STARTUP_TIMEOUT_S = 120.0
IDLE_ENV = "VISIONPIPE_PREFECT_IDLE_S"
DEFAULT_IDLE_S = 300.0
SERVER_MARK_ENV = "VISIONPIPE_SERVER"  # in every server's environment: how `status` finds them


# --- Where state lives ---


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


def mlflow_state_dir() -> Path:
    """MLflow server state: ``$VISIONPIPE_HOME/mlflow`` (``tasks/tracking_store.py`` reads it)."""
    return home() / "mlflow"


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


def locked(directory: Path) -> FileLock:
    """Serialise start and stop across processes (two stages must not start two servers)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(directory / "lock")


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


def started_at(pid: int) -> float | None:
    """When ``pid`` started (psutil's create time, epoch seconds); None if it is gone.

    With the pid it names one process for good: a pid reused later has a later start."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def read_state(directory: Path) -> dict[str, Any] | None:
    """The server record in ``directory``, None if absent or unreadable."""
    try:
        state = json.loads((directory / "server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "pid" in state else None


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Replace ``path`` whole: readers (every stage) never lock, and never see half of it."""
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(record))
    scratch.replace(path)


def is_running(state: Mapping[str, Any]) -> bool:
    """Whether the recorded process still runs and is that server (not a reused pid).

    A start time that no longer matches the record is no proof of a reused pid:
    psutil derives it from the boot time, which moves when the clock is stepped
    (on a CI VM it moved 36 s, and the server was then never stopped). Then the
    process's command line decides: a server serving the recorded port is it.
    """
    pid = int(state["pid"])
    recorded, current = state.get("pid_start"), started_at(pid)
    if current is None:
        return False
    if recorded is None or abs(current - recorded) < 0.5:
        return True
    return serves_port(command_line(pid), state.get("port"))


def command_line(pid: int) -> list[str]:
    """``pid``'s command line; empty when it is gone or not readable."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def serves_port(command: list[str], port: Any) -> bool:
    """Whether ``command`` is a server (``prefect server start``, ``mlflow server``) on ``port``."""
    if port is None or "server" not in command or "--port" not in command:
        return False
    given = command.index("--port") + 1
    return given < len(command) and command[given] == str(port)


def stop_process(pid: int, grace: float = 10.0) -> None:
    """Terminate ``pid`` and its children; kill what is left after ``grace`` seconds."""
    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for each in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for each in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.kill()
    psutil.wait_procs(alive, timeout=grace)


def _wait_healthy(url: str, timeout: float, running: Any, what: str, hint: str, log: Path) -> None:
    """Wait for ``url``/health; on exit of ``running()`` or timeout, raise with the log's tail."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        status = running()
        if status is not None or time.monotonic() > deadline:
            why = (
                f"exited with status {status}"
                if status is not None
                else f"did not answer within {timeout:.0f} s"
            )
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"the local {what} on {url} {why} ({hint}). Last lines of {log}:\n{tail}"
            )
        time.sleep(0.25)


# --- The Prefect server, on Prefect's own lifecycle ---


def _prefect_env(directory: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(directory / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        SERVER_MARK_ENV: json.dumps(
            {"what": "Prefect server", "state": str(directory), "url": api_url or ""}
        ),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def recorded_url(directory: Path, key: str) -> str | None:
    """The URL under ``key`` in ``directory``'s server record, if that server answers."""
    state = read_state(directory)
    if state and healthy(state.get(key, "")):
        return state[key]
    return None


def local_server_url(directory: Path | None = None) -> str | None:
    """The API URL of the local Prefect server, if it is up."""
    return recorded_url(directory or state_dir(), "api_url")


def start_local_server(
    directory: Path | None = None, timeout: float | None = None, *, stop_when_idle: bool = False
) -> str:
    """Start (or reuse) the local Prefect server; its API URL once it answers /health.

    ``prefect server start`` on a free loopback port, with its ``PREFECT_HOME``
    in ``directory``. With ``stop_when_idle`` (a stage) the
    server may stop after ``idle_seconds()`` unused; without it (``visionpipe
    up``, a script or test that points ``PREFECT_API_URL`` at it) it stays up
    until stopped, a running one included: a ``keep`` file says so.
    """
    directory = directory or state_dir()
    timeout = timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S))
    with locked(directory):
        if not stop_when_idle:
            (directory / "keep").touch()
        if url := local_server_url(directory):
            return url
        if stop_when_idle:  # the keep file of an earlier server that was killed, not stopped
            (directory / "keep").unlink(missing_ok=True)
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = _prefect_env(directory, api_url)
        log = directory / "server.log"
        with open(log, "ab") as out:
            # A session of its own: the server must not get the terminal's Ctrl-C for dvc.
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start",
                 "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=directory, start_new_session=True,
            )  # fmt: skip
        pid = process.pid
        hint = f"raise {STARTUP_TIMEOUT_ENV} on a slow machine, or set PREFECT_API_URL"
        try:
            _wait_healthy(api_url, timeout, process.poll, "Prefect server", hint, log)
        except BaseException:
            stop_process(pid)
            process.wait()
            raise
        _write_json(directory / "server.json", {
            "pid": pid, "pid_start": started_at(pid), "port": port, "api_url": api_url,
            "idle_s": idle_seconds() if stop_when_idle else 0.0, "started": time.time(),
        })  # fmt: skip
        return api_url


def _stop_prefect(directory: Path) -> dict[str, Any] | None:
    """Stop the Prefect server ``directory`` records; its record if it was running.

    Call it holding ``locked(directory)``. The record goes first, so no stage is
    sent to a dying server; a stale one (the process gone, or its PID now
    another process's: the start time tells) is removed and nobody is signalled.
    """
    state = read_state(directory)
    running = state is not None and is_running(state)
    (directory / "server.json").unlink(missing_ok=True)
    if running:
        stop_process(int(state["pid"]))
    return state if running else None


def stop_local_server(directory: Path | None = None) -> bool:
    """Stop the local Prefect server this state folder records; False when none ran."""
    directory = directory or state_dir()
    with locked(directory):
        stopped = _stop_prefect(directory) is not None
        (directory / "keep").unlink(missing_ok=True)
    return stopped


# --- Leases: which stages use the Prefect server ---


@contextlib.contextmanager
def lease(directory: Path | None = None, stage: str = "a visionpipe command") -> Iterator[None]:
    """Mark this process as a user of the local server until the block ends.

    On the way out, a server a stage started (no ``keep``) gets a detached
    ``stop-when-idle`` that stops it if nothing uses it for ``idle_seconds()``.
    """
    directory = directory or state_dir()
    leases = directory / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    path = leases / str(os.getpid())
    _write_json(path, {"pid": os.getpid(), "started": started_at(os.getpid()),
                       "checkout": str(Path.cwd()), "stage": stage})  # fmt: skip
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        (directory / "last_used").touch()
        idle = idle_seconds()
        if idle > 0 and not (directory / "keep").exists() and read_state(directory):
            subprocess.Popen(
                [sys.executable, "-m", "tasks.servers", "stop-when-idle", str(directory),
                 str(idle)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=directory, start_new_session=True,
                env={**os.environ, "PYTHONPATH": _package_path()},
            )  # fmt: skip


def _package_path() -> str:
    """This checkout on PYTHONPATH, so ``-m tasks.servers`` runs from any folder."""
    checkout = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))


def live_leases(directory: Path) -> list[dict[str, Any]]:
    """Who holds a lease on ``directory``'s server (pid, checkout, stage), by pid; the
    leases of processes that have ended are removed."""
    alive = []
    for path in (directory / "leases").glob("*"):
        if not path.name.isdigit():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "pid" not in record:
            continue
        current = started_at(int(record["pid"]))
        if current is not None and record.get("started") in (None, current):
            alive.append(record)
        else:
            path.unlink(missing_ok=True)
    return sorted(alive, key=lambda record: record["pid"])


def describe_lease(record: Mapping[str, Any]) -> str:
    return f"'{record.get('stage', '?')}' of {record.get('checkout', '?')} (pid {record['pid']})"


def stop_when_idle(directory: Path, idle: float) -> bool:
    """Wait ``idle`` seconds, then stop the server if no stage has used it since; whether
    it stopped it. What ``lease`` leaves behind (``python -m tasks.servers stop-when-idle``)."""
    time.sleep(idle)
    if not directory.is_dir():  # its checkout was removed meanwhile: nothing left to stop
        return False
    with locked(directory):
        last = directory / "last_used"
        used = last.stat().st_mtime if last.exists() else 0.0
        if (directory / "keep").exists() or live_leases(directory):
            return False
        if time.time() - used < idle - 0.5:  # used since: that stage's own watcher decides
            return False
        state = read_state(directory)
        if state is None or not is_running(state):
            return False
        with open(directory / "server.log", "a") as log:
            log.write(f"visionpipe: no stage has used this server for {idle:g} s ({IDLE_ENV}): "
                      "stopping it\n")  # fmt: skip
        return _stop_prefect(directory) is not None


# --- The MLflow server ---


def mlflow_store(root: Path | None = None) -> tuple[str, str]:
    """The backend store URI and artifact root the stages use without a server, for ``root``."""
    root = root or Path.cwd()  # the same expressions as tasks/tracking_store.py
    return f"sqlite:///{(root / 'mlflow.db').resolve()}", (root / "mlruns").resolve().as_uri()


def mlflow_server_url(directory: Path | None = None) -> str | None:
    """The URL of the MLflow server ``up`` recorded, if it answers /health."""
    return recorded_url(directory or mlflow_state_dir(), "url")


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
            SERVER_MARK_ENV: json.dumps(
                {"what": "MLflow server", "state": str(directory), "url": url}
            ),
        }
        log = directory / "server.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1", "--backend-store-uri", store,
                 "--default-artifact-root", artifacts, "--no-serve-artifacts"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=root, start_new_session=True,
            )  # fmt: skip
        hint = f"raise {MLFLOW_STARTUP_TIMEOUT_ENV} on a slow machine"
        try:
            _wait_healthy(url, timeout, process.poll, "MLflow server", hint, log)
        except BaseException:
            stop_process(process.pid)
            process.wait()
            raise
        _write_json(directory / "server.json", {
            "pid": process.pid, "pid_start": started_at(process.pid), "port": port, "url": url,
            "backend_store_uri": store, "artifact_root": artifacts, "started": time.time(),
        })  # fmt: skip
        return url


def stop_mlflow_server(directory: Path | None = None) -> dict[str, Any] | None:
    """Stop the MLflow server this state folder records; its record, None when none ran.

    A stale record (the process gone, or its pid reused by another) is removed untouched."""
    directory = directory or mlflow_state_dir()
    with locked(directory):
        state = read_state(directory)
        if state is None:
            return None
        running = is_running(state)
        if running:
            stop_process(int(state["pid"]))
        (directory / "server.json").unlink(missing_ok=True)
        return state if running else None


# --- up, down, status ---


class ServerInUse(RuntimeError):
    """``down`` was asked to stop a Prefect server while a running stage uses it."""


def up(root: Path | None = None, timeout: float | None = None) -> dict[str, str]:
    """Start (or reuse) both servers; their URLs: ``prefect_ui``, ``prefect_api``, ``mlflow``.

    Both start at once (each spends most of its seconds importing). If either
    fails, the one this call started is stopped again, so ``up`` leaves all or
    nothing new behind, and RuntimeError says what failed with its log's tail.
    """
    already = {"prefect": local_server_url() is not None, "mlflow": mlflow_server_url() is not None}
    with ThreadPoolExecutor(max_workers=2) as pool:
        prefect = pool.submit(start_local_server, None, timeout)
        mlflow = pool.submit(start_mlflow_server, None, root, timeout)
    errors = [error for error in (prefect.exception(), mlflow.exception()) if error]
    if errors:
        if prefect.exception() is None and not already["prefect"]:
            stop_local_server()
        if mlflow.exception() is None and not already["mlflow"]:
            stop_mlflow_server()
        raise RuntimeError("\n\n".join(str(error) for error in errors)) from errors[0]
    api_url = prefect.result()
    return {"prefect_ui": api_url.removesuffix("/api"), "prefect_api": api_url,
            "mlflow": mlflow.result()}  # fmt: skip


def down(force: bool = False) -> list[str]:
    """Stop both recorded servers; one line per server that was running, for the CLI.

    The Prefect server is shared by every checkout of this user: while a stage
    of any of them holds a lease on it, ``ServerInUse`` names those stages and
    nothing is stopped, unless ``force``.
    """
    using = [describe_lease(r) for r in live_leases(state_dir())]
    if using and not force and local_server_url() is not None:
        raise ServerInUse(
            "the local Prefect server is in use by " + "; ".join(using) + ". Stopping it "
            "now leaves their flow runs unreported: wait for them, or `visionpipe down --force`"
        )
    directory = state_dir()
    prefect_state = read_state(directory)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each takes seconds to shut down
        prefect = pool.submit(stop_local_server, directory)
        mlflow = pool.submit(stop_mlflow_server)
    stopped = []
    if prefect.result() and prefect_state is not None:
        stopped.append(f"Prefect server {prefect_state['api_url']} "
                       f"(pid {prefect_state['pid']}, state in {directory})")  # fmt: skip
    if mlflow_state := mlflow.result():
        stopped.append(f"MLflow server {mlflow_state['url']} "
                       f"(pid {mlflow_state['pid']}, state in {mlflow_state_dir()})")  # fmt: skip
    return stopped


@dataclass(frozen=True)
class RunningServer:
    """A visionpipe server process found on this machine (``servers_on_machine``)."""

    pid: int
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
    """Every visionpipe server this user runs, found by the mark in its environment (also
    those whose checkout or state folder is gone); a marked server's children are not
    listed apart from it."""
    marked: dict[int, tuple[dict[str, str], psutil.Process]] = {}
    for process in psutil.process_iter(["pid", "ppid", "environ", "cwd", "create_time"]):
        variables = process.info["environ"] or {}
        try:
            mark = json.loads(variables[SERVER_MARK_ENV])
        except (KeyError, ValueError):
            continue
        marked[process.info["pid"]] = (mark, process)
    found = [
        RunningServer(
            pid,
            mark["what"],
            mark.get("url") or "?",
            mark["state"],
            process.info["cwd"] or "",
            process.info["create_time"],
        )
        for pid, (mark, process) in marked.items()
        if process.info["ppid"] not in marked
    ]
    return sorted(found, key=lambda server: server.started)


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
        describe_lease(record)
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
        stop_process(server.pid)
        state = Path(server.state)
        if state.is_dir():
            record = read_state(state)
            if record is not None and int(record["pid"]) == server.pid:
                (state / "server.json").unlink(missing_ok=True)
            (state / "keep").unlink(missing_ok=True)
        lines.append(server.describe())
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.servers stop-when-idle DIR SECONDS`` (what ``lease`` leaves behind)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "stop-when-idle":
        print("usage: python -m tasks.servers stop-when-idle STATE_DIR SECONDS", file=sys.stderr)
        return 2
    stop_when_idle(Path(args[1]), float(args[2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
