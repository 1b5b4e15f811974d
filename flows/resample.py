"""resample: rebalance the train split with imbalanced-learn into data/resampled/.

Run: ``dvc repro resample`` (or ``python -m flows.resample``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks.data import resample as t
from tasks.data.datasets import load_prepared
from tasks.layout import PREPARED_DIR, RESAMPLED_DIR, metrics_path
from tasks.params import ResampleParams

METRICS = metrics_path("resample")


@flow(name="resample")
def resample_flow(seed: int, resample: ResampleParams) -> dict:
    prepared = load_prepared(PREPARED_DIR)
    result = t.resample(prepared.train, prepared.num_classes, resample, seed, prepared.stats)
    metrics = t.write(RESAMPLED_DIR, METRICS, result, prepared.classes, resample)
    for warning in result.warnings:
        get_run_logger().warning(warning)
    get_run_logger().info(
        "resample (%s): %s -> %s train images, %s synthetic; per class %s -> %s",
        resample.strategy, metrics["train_before"], metrics["train_after"],
        metrics["synthetic"], result.counts_before, result.counts_after,
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    stage_main(resample_flow)
