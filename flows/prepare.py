"""prepare: decode, validate, convert, de-duplicate and split the source into data/prepared/.

Run: ``dvc repro prepare`` (or ``python -m flows.prepare``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks.data import prepare as t
from tasks.data.spec import image_spec
from tasks.layout import DATA_QUALITY, PREPARED_DIR, metrics_path
from tasks.params import DataParams

METRICS = metrics_path("prepare")
QUALITY = DATA_QUALITY


@flow(name="prepare")
def prepare_flow(seed: int, data: DataParams) -> dict:
    logger = get_run_logger()
    source = t.load_source(data, seed)
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
        selection = t.select(source, decoded, data.min_per_class)
        plan = t.split(source, selection, data, seed)
        baselines = t.write_prepared(PREPARED_DIR, staging, plan, source, spec, seed, logger.info)
    metrics = t.report(METRICS, QUALITY, source, decoded, selection, plan, data, spec, baselines)
    logger.info(t.summary(metrics, source, selection, QUALITY))
    return metrics


if __name__ == "__main__":
    stage_main(prepare_flow)
