"""Stages whose servers die under them: ``python -m tests.api_loss_stage STATE WHEN``.

Runs like every stage (``flows.prefect_api.run_stage`` against the local server
recorded in ``STATE``): three steps of work as Prefect tasks, the server killed
after the first. ``WHEN`` is ``finished`` (the metrics file, the stage's last
output, is then written after the kill) or ``unfinished`` (a step fails for
want of an input after the kill, before any metrics are written); with
``mlflow`` it is the MLflow tracking server recorded in ``STATE`` that dies,
while the stage's run is open.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow, task

from flows.prefect_api import run_stage
from tasks.artifacts import write_json
from tasks.layout import metrics_path
from tasks.servers import stop_local_server


@task
def step(i: int) -> int:
    time.sleep(1)
    return i


@flow(name="prepare")
def stage(state: str, when: str) -> dict:
    step(0)
    stop_local_server(Path(state))
    print(f"server killed at {time.time():.3f}", flush=True)
    for i in (1, 2):
        step(i)
    if when == "unfinished":
        raise FileNotFoundError("data/prepared/train: an input the dead run never wrote")
    metrics = {"images": 3}
    write_json(metrics_path("prepare"), metrics)
    return metrics


@flow(name="train")
def tracked_stage(state: str) -> dict:
    """A stage whose MLflow tracking server dies while its run is open."""
    import mlflow

    from tasks.servers import stop_mlflow_server
    from tasks.tracking import start_run

    with start_run("api-loss", "train", stage="train", variant="teacher", params={}) as run:
        mlflow.log_metric("step", 0)
        stop_mlflow_server(Path(state))
        print(f"server killed at {time.time():.3f}", flush=True)
        step(1)
        mlflow.log_metric("step", 1)  # the tracking server is gone
    return {"run_id": run.info.run_id}


def main(argv: list[str]) -> None:
    if argv[1] == "mlflow":
        run_stage(tracked_stage, state=argv[0])
    else:
        run_stage(stage, state=argv[0], when=argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
