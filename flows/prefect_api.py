"""How a stage process reaches a Prefect API, and the one way every stage runs.

Prefect needs an API to record flow and task runs. In order of preference:

1. ``PREFECT_API_URL`` is set: use it as is (a team's server, Prefect Cloud, or
   your own ``prefect server start``).
2. Otherwise the local server of ``tasks/servers.py``: a real
   ``prefect server start``, one per user, started by the first
   stage that needs it (or ``visionpipe up``) and reused by every later one;
   a stage holds a lease on it while it runs.
3. ``VISIONPIPE_PREFECT=ephemeral`` falls back to Prefect's own per-process
   ephemeral server.

Why not 3 by default: the ephemeral server starts inside every stage process
and costs about 10 s per stage on a 2-core machine, six times per ``dvc
repro``; a server started once costs that once, then about 2 s of API traffic
per stage (``benchmarks/prefect_overhead.py`` measures both).

Every stage imports this module, so whatever it imports becomes a code
dependency of every stage in ``dvc.yaml`` (``tests/test_dvc_yaml.py``): how a
stage reaches Prefect changes no output, so this module and ``tasks/servers.py``
are deliberately not deps.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tasks.params import ParamsError, load_params
from tasks.servers import lease, read_state, start_local_server, state_dir

T = TypeVar("T")
MODE_ENV = "VISIONPIPE_PREFECT"


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
