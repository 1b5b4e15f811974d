"""retrain: pull, let DVC re-run what is stale, register the models, promote the winner.

    dvc pull (remote configured) -> dvc repro -> register the three variants
    -> score challenger and champion on the same test split -> move the alias?
    -> log the decision (MLflow run + Prefect artifact) -> dvc push (remote configured)

DVC, not this flow, decides what re-runs: ``dvc repro`` through DVC's own CLI,
so a retrain with no change to data, code or params runs no stage and, the
model files being byte-identical, registers no new version. The challenger
is the new ``visionpipe-student_int8`` version; it takes the ``champion``
alias only within the budgets of ``promote:`` in params.yaml
(``tasks/registry.decide``).

Transient failures (the DVC remote, the registry) are retried with
exponential backoff; each retry is logged, and a step that still fails fails
the flow run: nothing is skipped silently. A failing ``dvc repro`` is not
retried: the same code on the same data fails the same way.

Run it once: ``python -m flows.retrain``. On a schedule: ``visionpipe serve-deployment``
(this machine) or ``visionpipe deploy --pool NAME`` and a Prefect worker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.tasks import exponential_backoff

from flows.prefect_api import run_stage
from tasks.data.datasets import load_prepared
from tasks.layout import PREPARED_DIR, metrics_path
from tasks.orchestration import stage_task
from tasks.params import load_params
from tasks.serving import registry
from tasks.tracking import data_hash, git_commit, start_run


def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry what a second try can fix: I/O, the tracking server, a failed dvc command.

    A bug (KeyError, ValueError, ...) fails at once instead of three more times.
    """
    from mlflow.exceptions import MlflowException

    try:
        state.result()
    except (OSError, MlflowException, RuntimeError):
        return True
    except Exception:
        return False
    return False


TRANSIENT = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
             "retry_jitter_factor": 0.5, "retry_condition_fn": _transient}  # fmt: skip


PREFECT_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")


def _dvc(*args: str, echo: bool = False) -> tuple[int, str]:
    """Run ``dvc <args>`` here; return its exit status and output (each line logged if ``echo``).

    The stages' commands say ``python -m flows.<stage>``: this interpreter's
    folder goes first on PATH so that is the venv's python even when a worker
    was started without activating it. The stages reach the same Prefect API
    as this flow.
    """
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they happen, not at exit
    if api_url := PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = api_url
    logger = get_run_logger() if echo else None
    lines = []
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    ) as process:  # fmt: skip
        for line in process.stdout:
            lines.append(line)
            # A stage's own Prefect log lines are already in its flow run; echo the rest.
            if logger is not None and line.strip() and not PREFECT_LOG_LINE.match(line):
                logger.info("%s", line.rstrip())
    return process.returncode, "".join(lines)


def default_remote() -> str | None:
    """The DVC remote ``dvc pull``/``push`` would use, or None when there is none."""
    code, output = _dvc("remote", "default")
    name = output.strip()
    return name if code == 0 and name and " " not in name else None


def _check(result: tuple[int, str], what: str) -> str:
    code, output = result
    if code != 0:
        raise RuntimeError(f"`dvc {what}` failed (exit {code}):\n{output.strip()[-4000:]}")
    return output


@stage_task(name="dvc-pull", **TRANSIENT)
def dvc_pull(remote: str) -> str:
    """What the remote has of this commit's data and outputs.

    ``--allow-missing``: an output nobody pushed yet (a new remote, a new
    commit) is not an error; ``dvc repro`` rebuilds it. An unreachable remote is.
    """
    args = ("pull", "--remote", remote, "--allow-missing")
    return _check(_dvc(*args, echo=True), " ".join(args))


@stage_task(name="dvc-push", **TRANSIENT)
def dvc_push(remote: str) -> str:
    return _check(_dvc("push", "--remote", remote, echo=True), f"push --remote {remote}")


@stage_task(name="dvc-repro")
def dvc_repro() -> list[str]:
    """Run the pipeline; return the stages DVC re-ran (none when nothing was stale)."""
    output = _check(_dvc("repro", echo=True), "repro")
    return [
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    ]


@stage_task(name="register-models", **TRANSIENT)
def register(metrics: dict, tags: dict[str, str]) -> dict[str, registry.Registered]:
    return registry.register_variants(registry.VARIANT_FILES, metrics, tags)


@stage_task(name="score", **TRANSIENT)
def score(uri: str, version: str, metrics: dict | None = None) -> registry.Candidate:
    prepared = load_prepared(PREPARED_DIR)
    f1, how = registry.score(uri, prepared.test, prepared.classes)
    get_run_logger().info("%s: test f1_macro %s (%s)", uri, f1, how)
    targets = (metrics or {}).get("targets", {})
    return registry.Candidate(
        version=version,
        f1_macro=f1,
        int8_drop=targets.get("f1_macro_drop", {}).get("value"),
        latency_ratio=targets.get("latency_ratio_b64", {}).get("value"),
    )


@stage_task(name="promote", **TRANSIENT)
def promote(version: str) -> None:
    registry.set_champion(version)


@flow(name="retrain")
def retrain(pull: bool | None = None, push: bool | None = None) -> dict:
    """One retrain: returns the decision (``promote``, ``summary``, the numbers compared).

    ``pull``/``push`` default to ``retrain.pull``/``retrain.push`` in params.yaml;
    either only happens when a DVC remote is configured.
    """
    logger = get_run_logger()
    params = load_params()
    pull = params.retrain.pull if pull is None else pull
    push = params.retrain.push if push is None else push
    remote = default_remote()
    if pull and remote:
        dvc_pull(remote)
    ran = dvc_repro()
    logger.info("dvc repro re-ran %s", ", ".join(ran) if ran else "nothing (all up to date)")
    metrics = json.loads(metrics_path("evaluate").read_text())

    tags = {"git_commit": git_commit(), "data_hash": data_hash()}
    run_params = {**params.promote.flat("promote"), "stages_rerun": ",".join(ran) or "none"}
    with start_run(
        params.mlflow.experiment, "retrain", stage="retrain", variant=registry.CHALLENGER,
        params=run_params,
    ) as run:  # fmt: skip
        versions = register(metrics, tags)
        for entry in versions.values():
            logger.info("%s version %s (%s)", entry.name, entry.version,
                        "new" if entry.created else "already registered")  # fmt: skip
        new = versions[registry.CHALLENGER]
        challenger = score(new.uri, new.version, metrics[registry.CHALLENGER])
        current = registry.champion_version()
        champion = None
        if current is not None:
            uri = registry.champion_uri()
            champion = challenger if current == new.version else score(uri, current)
        decision = registry.decide(challenger, champion, params.promote)
        if decision.promote:
            promote(new.version)
        logger.info("retrain: %s: %s", decision.verdict, decision.summary)
        mlflow_client_log(run.info.run_id, decision)
    create_markdown_artifact(
        key="retrain-decision", markdown=decision.markdown(), description="visionpipe retrain"
    )
    if push and remote:
        dvc_push(remote)
    return {**decision.to_json(), "stages_rerun": ran,
            "versions": {k: v.version for k, v in versions.items()}}  # fmt: skip


def mlflow_client_log(run_id: str, decision: registry.Decision) -> None:
    """The decision on the retrain run: its numbers as metrics, the table as an artifact."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in decision.metrics().items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "decision", "promoted" if decision.promote else "kept")
    client.set_tag(run_id, "decision_verdict", decision.verdict)
    client.set_tag(run_id, "decision_summary", decision.summary)
    client.log_text(run_id, decision.markdown(), "decision.md")
    client.log_dict(run_id, decision.to_json(), "decision.json")


if __name__ == "__main__":
    load_params()  # a bad params.yaml fails here, before any server starts
    result = run_stage(retrain)
    print(json.dumps({k: result[k] for k in ("promote", "summary", "versions")}, indent=2))
