"""audit: near-duplicates, likely label errors and outliers, found before the split.

Run: ``dvc repro audit`` (or ``python -m flows.audit``); ``visionpipe audit``
prints the top suspects. Reads the ``seed``, ``data`` and ``audit`` sections and
the ``audit.exclude`` list; writes ``data/audit/`` (embeddings, and the
near-duplicate clusters that prepare keeps in one split), ``reports/audit.json``,
``reports/audit/index.html`` and ``metrics/audit.json``, and logs them to MLflow.
Nothing in the source folder is deleted or moved.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks import tracking
from tasks.data import audit as a
from tasks.data import prepare as t
from tasks.data.spec import image_spec
from tasks.layout import AUDIT_DIR, AUDIT_GALLERY_DIR, AUDIT_REPORT, metrics_path
from tasks.params import AuditParams, DataParams, MlflowParams

METRICS = metrics_path("audit")


@flow(name="audit")
def audit_flow(seed: int, data: DataParams, audit: AuditParams, mlflow: MlflowParams) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    source = t.load_source(data, seed)
    excluded = np.isin(source.item_names, sorted(t.read_exclude(audit.exclude)))
    spec = image_spec(data, source, seed)
    with t.staging_file(AUDIT_DIR, len(source), spec) as staging:
        decoded = t.decode(
            source, spec, staging, t.worker_count(data.workers), logger.info, data.decode_timeout_s
        )
        embedded = a.embed_source(
            source, decoded.ok, decoded.reasons, staging.path, excluded, spec, audit, logger.info
        )
    labels = source.labels[embedded.positions]
    findings = a.find(embedded, labels, len(source.classes), audit, seed)
    for name, why in sorted(findings.issues.skipped.items()):
        logger.warning("audit: label errors not checked in class %s: %s", source.classes[name], why)
    written = a.write_audit(
        AUDIT_DIR, AUDIT_REPORT, METRICS, AUDIT_GALLERY_DIR, source, embedded, findings,
        int(excluded.sum()), audit, time.perf_counter() - started,
    )  # fmt: skip
    metrics = written["metrics"]
    with tracking.start_run(
        mlflow.experiment, "audit", stage="audit", variant="data", params=audit.flat("audit")
    ) as run:
        run_id = run.info.run_id
        tracking.log_results(run_id, metrics, [AUDIT_REPORT, AUDIT_GALLERY_DIR / "index.html"])
        if written["rows"]:  # searchable in the MLflow UI's artifact view
            columns = ("path", "kind", "score", "class", "cluster", "suggested")
            table = [{key: row.get(key) for key in columns} for row in written["rows"]]
            tracking.log_table(run_id, table, "audit_flagged.json")
    logger.info(
        "audit: %s images embedded at %s px in %.0f s: %s near-duplicate clusters (%s images), "
        "%s likely label errors, %s outliers, %s blank or extreme; gallery %s",
        metrics["embedded"], embedded.input_size, metrics["seconds"]["total"],
        metrics["near_duplicate_clusters"], metrics["near_duplicate_images"],
        metrics["label_issues"], metrics["outliers"],
        metrics["blank"] + metrics["too_dark"] + metrics["too_bright"],
        AUDIT_GALLERY_DIR / "index.html",
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    stage_main(audit_flow)
