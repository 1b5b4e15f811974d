"""The scheduled retrain deployment: served from this machine, or deployed to a work pool.

Both read the schedule from ``retrain.cron``/``retrain.timezone`` in
params.yaml (default nightly at 03:00 UTC) and cap the deployment at one
concurrent run, so two retrains never race on the same repository and
registry (a second scheduled run waits until the first finishes).

- ``visionpipe serve-deployment``: ``retrain.serve(...)``. This process creates the
  deployment and runs its flow runs itself until stopped (Ctrl-C); the
  simplest way to retrain nightly on one machine.
- ``visionpipe deploy --pool NAME``: what ``prefect deploy`` does, with the
  schedule from params.yaml: a deployment whose code is this checkout
  (``from_source``; the pull step changes into it), run by any
  ``prefect worker start --pool NAME`` on a machine that has the checkout at
  the same path (a process pool; Docker/Kubernetes pools need an image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.schedules import Cron

from flows.retrain import retrain
from tasks.params import RetrainParams, load_params

DEPLOYMENT = "nightly"
ENTRYPOINT = "flows/retrain.py:retrain"
CONCURRENCY_LIMIT = 1
DESCRIPTION = "dvc pull, dvc repro, register the models, promote the int8 champion, dvc push"


def schedule(config: RetrainParams) -> Cron:
    return Cron(config.cron, timezone=config.timezone)


def deployment_options(config: RetrainParams) -> dict[str, Any]:
    """What both paths give Prefect: schedule, parameters, concurrency, description."""
    return {
        "schedules": [schedule(config)],
        "parameters": {"pull": config.pull, "push": config.push},
        "description": DESCRIPTION,
        "tags": ["visionpipe"],
    }


def serve(name: str = DEPLOYMENT) -> None:
    """Create the deployment and run its scheduled (and manually triggered) runs here."""
    config = load_params().retrain
    retrain.serve(name=name, global_limit=CONCURRENCY_LIMIT, **deployment_options(config))


def deploy(pool: str, name: str = DEPLOYMENT, root: Path | None = None) -> str:
    """Register the deployment on work pool ``pool``; return its ``flow/deployment`` name."""
    root = (root or Path.cwd()).resolve()
    config = load_params(root / "params.yaml").retrain
    source = retrain.from_source(source=str(root), entrypoint=ENTRYPOINT)
    source.deploy(
        name=name,
        work_pool_name=pool,
        concurrency_limit=CONCURRENCY_LIMIT,
        build=False,
        push=False,
        print_next_steps=False,
        **deployment_options(config),
    )
    return f"{retrain.name}/{name}"
