"""evaluate: teacher, student and int8 student on the test split; one MLflow run per variant.

Run: ``dvc repro evaluate`` (or ``python -m flows.evaluate``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.prefect_api import stage_main
from tasks import evaluate as t
from tasks import tracking
from tasks.artifacts import atomic_dir
from tasks.datasets import load_prepared
from tasks.layout import CONFUSION_DIR, PREPARED_DIR, STUDENT, STUDENT_INT8, TEACHER, metrics_path
from tasks.params import EvaluateParams, MlflowParams

METRICS = metrics_path("evaluate")


@flow(name="evaluate")
def evaluate_flow(evaluate: EvaluateParams, mlflow: MlflowParams) -> dict:
    logger = get_run_logger()
    prepared = load_prepared(PREPARED_DIR)
    variants = t.load_variants(TEACHER, STUDENT, STUDENT_INT8, evaluate.num_threads)
    results = {}
    with atomic_dir(CONFUSION_DIR) as confusion_dir:
        for variant in variants:
            if variant.classes != prepared.classes:
                raise ValueError(
                    f"{variant.artifact} was trained on other classes than data/prepared holds: "
                    "re-run the pipeline (dvc repro)"
                )
            evaluation = t.evaluate_variant(variant, prepared.test, evaluate)
            plots = t.write_confusion(
                variant.name, prepared.test.labels, evaluation.predicted, variant.classes,
                confusion_dir,
            )  # fmt: skip
            tags = {"source_run_id": variant.source_run_id or "", "runtime": variant.runtime}
            with tracking.start_run(
                mlflow.experiment, variant.name, stage="evaluate", variant=variant.name,
                params={**variant.run_params, **evaluate.flat("evaluate")}, tags=tags,
            ) as run:  # fmt: skip
                tracking.log_results(run.info.run_id, evaluation.metrics, list(plots))
                tracking.log_results(run.info.run_id, {}, [variant.artifact], "model")
            results[variant.name] = evaluation.metrics
            logger.info(
                "%s: f1_macro %.4f, accuracy %.4f, %s params, %s bytes, %.3f ms/image (%s)",
                variant.name, evaluation.metrics["f1_macro"], evaluation.metrics["accuracy"],
                variant.params, evaluation.metrics["size_bytes"],
                evaluation.metrics["latency_ms_b1"], variant.runtime,
            )  # fmt: skip
    t.write_metrics(METRICS, results)
    create_markdown_artifact(
        key="evaluate", markdown=t.comparison_markdown(results), description="visionpipe variants"
    )
    return results


if __name__ == "__main__":
    stage_main(evaluate_flow)
