"""prepare: decode, validate, convert, resize and split the source into data/prepared/.

Run: ``dvc repro prepare`` (or ``python -m flows.prepare``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks import prepare as t
from tasks.layout import DATA_QUALITY, PREPARED_DIR, metrics_path
from tasks.params import DataParams

METRICS = metrics_path("prepare")
QUALITY = DATA_QUALITY


@flow(name="prepare")
def prepare_flow(seed: int, data: DataParams) -> dict:
    source = t.load_source(data)
    converted = t.convert(source, data)
    splits = t.split(converted, data, seed)
    stats = t.channel_stats(splits["train"])
    metrics = t.write(PREPARED_DIR, METRICS, QUALITY, splits, source, converted, stats)
    get_run_logger().info(
        "prepare: %s images of %s (%s classes) -> train %s / val %s / test %s, %s quarantined%s",
        metrics["images"], source.name, metrics["num_classes"], metrics["train_size"],
        metrics["val_size"], metrics["test_size"], metrics["quarantined"],
        f" (listed in {QUALITY})" if metrics["quarantined"] else "",
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    stage_main(prepare_flow)
