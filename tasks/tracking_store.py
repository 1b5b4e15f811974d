"""Where MLflow runs go: the tracking URI, found without importing MLflow.

In order: ``MLFLOW_TRACKING_URI`` if set (a team's tracking server); else the
local MLflow server ``visionpipe up`` started in front of this repository's
store, if it answers; else that store itself, ``sqlite:///mlflow.db`` at the
repository root with artifacts in ``mlruns/``. Used by ``tasks/tracking.py``
(every stage's runs), ``visionpipe predict`` and ``visionpipe status``, which
must answer in well under a second and so cannot pay for importing MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.servers import healthy, mlflow_state_dir, read_state


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the local server for ``root``'s store, else the store.

    ``root`` is the repository root (default: the working directory); the
    store is ``sqlite:///<root>/mlflow.db``.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    store = f"sqlite:///{((root or Path.cwd()) / 'mlflow.db').resolve()}"
    return local_server_url(store) or store


def local_server_url(store: str) -> str | None:
    """The URL of the MLflow server ``visionpipe up`` runs in front of ``store``, if it answers.

    ``tasks/servers.py`` starts it and records it in ``$VISIONPIPE_HOME/mlflow/server.json``.
    A server in front of any other store is ignored: a test's or another
    checkout's runs must not land in it. Cost: no request when none is
    recorded, else one loopback request, at most 1 s.
    """
    state = read_state(mlflow_state_dir())
    if state is None or state.get("backend_store_uri") != store or "url" not in state:
        return None
    return state["url"] if healthy(state["url"], timeout=1.0) else None
