"""A stage whose Prefect server dies under it: ``python -m tests.api_loss_stage STATE WHEN``.

Runs like every stage (``flows.prefect_api.run_stage`` against the local server
recorded in ``STATE``): three steps of work as Prefect tasks, the server killed
after the first. ``WHEN`` is ``finished`` (the metrics file, the stage's last
output, is then written after the kill) or ``unfinished`` (a step fails for
want of an input after the kill, before any metrics are written).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from prefect import flow, task

from flows.prefect_api import run_stage, stop_local_server
from tasks.artifacts import write_json
from tasks.layout import metrics_path


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


if __name__ == "__main__":
    run_stage(stage, state=sys.argv[1], when=sys.argv[2])
