"""prepare: decode, validate, convert, de-duplicate and split the source into data/prepared/.

Runs after the audit stage: each near-duplicate cluster it found lands in one
split (``audit.split_groups``), and the files listed in ``audit.exclude`` are
left out (quarantined as ``excluded``).

Run: ``dvc repro prepare`` (or ``python -m flows.prepare``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks.data import prepare as t
from tasks.data.spec import image_spec
from tasks.layout import AUDIT_DIR, DATA_QUALITY, PREPARED_DIR, metrics_path
from tasks.params import AuditParams, DataParams

METRICS = metrics_path("prepare")
QUALITY = DATA_QUALITY


@flow(name="prepare")
def prepare_flow(seed: int, data: DataParams, audit: AuditParams) -> dict:
    logger = get_run_logger()
    source = t.load_source(data, seed)
    # split_groups: false still reads the clusters, to report which ones the split cuts
    clusters = t.read_clusters(AUDIT_DIR / "groups.json", source, required=audit.split_groups)
    spec = image_spec(data, source, seed)
    if t.content_versioned(data.source) is False:
        logger.warning(
            "data.source %s is outside %s/: DVC does not see its content, so adding or "
            "editing an image there will not re-run prepare. Move it under %s/ and `dvc add` "
            "it (README: bring your own images).",
            data.source, t.RAW_DATA_DIR, t.RAW_DATA_DIR,
        )  # fmt: skip
    with t.staging_file(PREPARED_DIR, len(source), spec) as staging:
        decoded = t.decode(
            source, spec, staging, t.worker_count(data.workers), logger.info, data.decode_timeout_s
        )
        selection = t.select(source, decoded, data.min_per_class, t.read_exclude(audit.exclude))
        plan = t.split(source, selection, data, seed, clusters if audit.split_groups else None)
        baselines = t.write_prepared(PREPARED_DIR, staging, plan, source, spec, seed, logger.info)
    grouping = t.clusters_by_split(plan, source.item_names, clusters or [])
    metrics = t.report(
        METRICS, QUALITY, source, decoded, selection, plan, data, spec, baselines, grouping
    )
    logger.info(t.summary(metrics, source, selection, QUALITY))
    return metrics


if __name__ == "__main__":
    stage_main(prepare_flow)
