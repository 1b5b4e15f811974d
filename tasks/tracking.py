"""MLflow tracking: where runs go and what every run carries.

The tracking URI comes from ``tasks/tracking_store.py``: a team's server
(``MLFLOW_TRACKING_URI``), else the local server in front of this
repository's ``sqlite:///mlflow.db`` store, else the store itself. The
server and the direct path read and write the same database and folder, so
a run lands in the same place whichever is used, and the pipeline runs the
same with the server down.

Every run is tagged with ``stage``, ``variant``, the git commit and the hash of
the prepared data recorded in ``dvc.lock``, so any number in the MLflow UI
leads back to the code and data that produced it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import psutil
import yaml
from mlflow.entities import Metric

from tasks.tracking_store import tracking_uri

if TYPE_CHECKING:
    from tasks.training.engine import EpochRecord


def use_experiment(name: str, root: Path | None = None) -> str:
    """Point MLflow at the tracking URI and experiment ``name``; return its id."""
    root = root or Path.cwd()
    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    team_server = "MLFLOW_TRACKING_URI" in os.environ
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local database keeps its artifacts beside it, not wherever the cwd is; the local
    # server (`visionpipe up`) fronts that same database, so the same holds through it.
    # A team's server decides where its artifacts go.
    location = None if team_server else (root / "mlruns").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return mlflow.get_experiment_by_name(name).experiment_id


# What `dvc repro` itself rewrites while it runs; changes there do not make a run "dirty".
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots", "reports")


def git_commit(root: Path | None = None) -> str:
    """HEAD's commit, ``-dirty`` when code or params differ from it; ``unknown`` outside git."""
    cwd = root or Path.cwd()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        excluded = [f":(exclude){path}" for path in PIPELINE_OUTPUTS]
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ".", *excluded],
            cwd=cwd,
            capture_output=True,
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_hash(lock_path: Path = Path("dvc.lock"), out: str = "data/prepared") -> str:
    """The md5 DVC recorded for the prepared data (``unknown`` before a first ``dvc repro``)."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    except FileNotFoundError:
        return "unknown"
    for entry in lock.get("stages", {}).get("prepare", {}).get("outs", []):
        if entry.get("path") == out:
            return str(entry.get("md5", "unknown"))
    return "unknown"


OWNER_TAG = "visionpipe.owner"  # "<host>:<pid>:<start, epoch seconds>" of the run's process
ABANDONED_TAG = "visionpipe.abandoned"


def _started(pid: int) -> str:
    """When ``pid`` started (psutil's create time, epoch seconds), "" if it is gone."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def process_owner(pid: int | None = None) -> str:
    """This process (or ``pid``) as a run's owner: host, pid and start time."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def _owner_gone(owner: str) -> bool:
    """Whether the process ``owner`` names has ended (only knowable on its own host)."""
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    current = _started(int(pid))
    return current == "" or (started != "" and current != started)


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark ``FAILED`` the experiment's RUNNING runs whose owning process has ended."""
    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    closed = []
    for run in running:
        owner = run.data.tags.get(OWNER_TAG)
        if owner is None or not _owner_gone(owner):
            continue
        client.set_tag(
            run.info.run_id,
            ABANDONED_TAG,
            f"its process ({owner}) ended without closing it; marked FAILED when next seen",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    return closed


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    *,
    stage: str,
    variant: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run carrying the stage, variant, params, git commit and data hash.

    It also records which process opened it (``visionpipe.owner``), and first
    closes the experiment's runs whose process is gone but which were left
    ``RUNNING`` (the tracking server or the stage died before the run could
    be ended): they are marked ``FAILED``, so none stays RUNNING forever.
    """
    experiment_id = use_experiment(experiment)
    close_abandoned_runs(experiment_id)
    all_tags = {
        "stage": stage,
        "variant": variant,
        "git_commit": git_commit(),
        "data_hash": data_hash(),
        OWNER_TAG: process_owner(),
        **(tags or {}),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        mlflow.log_params({key: str(value) for key, value in params.items()})
        yield run


def log_epoch(run_id: str, record: EpochRecord) -> None:
    """Training curves: every field of the epoch record, stepped by epoch, in one batch."""
    values = asdict(record)
    epoch = values.pop("epoch")
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        run_id, metrics=[Metric(key, float(v), now, epoch) for key, v in values.items()]
    )


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict, keys joined with dots, as MLflow wants.

    A confidence interval (a ``*_ci`` key holding ``[low, high]``) becomes two
    metrics, ``<key>_low`` and ``<key>_high``; other lists are not metrics.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(scalar_metrics(value, prefix=f"{name}."))
        elif isinstance(value, int | float):  # bool included
            flat[name] = float(value)
        elif (
            name.endswith("_ci")
            and isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(bound, int | float) for bound in value)
        ):
            flat[f"{name}_low"], flat[f"{name}_high"] = map(float, value)
    return {_metric_key(k): v for k, v in flat.items()}


def _metric_key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; class names may hold anything.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def log_results(
    run_id: str, metrics: Mapping[str, Any], artifacts: list[Path], artifact_path: str | None = None
) -> None:
    """Log the numeric metrics and the given files to an existing run."""
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in scalar_metrics(metrics).items()]
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Tag an existing run (one call per tag: MLflow has no batch for tags alone)."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Log dict rows (same keys) as an MLflow table artifact, one column per key."""
    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    mlflow.MlflowClient().log_table(run_id, data=columns, artifact_file=artifact_file)
