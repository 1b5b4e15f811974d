"""evaluate: teacher, student and int8 student on the test split; one MLflow run per variant.

Latency is measured first, every runtime of every variant back to back, then
the scores; the int8 model's compression targets are checked against the student
(``tasks/evaluation/stage.py``: the steps, in order).

Run: ``dvc repro evaluate`` (or ``python -m flows.evaluate``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.prefect_api import stage_main
from tasks.artifacts import atomic_dir
from tasks.data.datasets import load_prepared
from tasks.evaluation.evaluate import write_metrics
from tasks.evaluation.report import comparison_markdown
from tasks.evaluation.stage import score_variants, track_variants, write_evaluation_files
from tasks.evaluation.variants import load_variants
from tasks.layout import (
    CONFUSION_DIR,
    EVALUATION_DIR,
    PREPARED_DIR,
    STUDENT,
    STUDENT_FP32_ONNX,
    STUDENT_INT8,
    TEACHER,
    TEACHER_ONNX,
    metrics_path,
)
from tasks.params import EvaluateParams, MlflowParams

METRICS = metrics_path("evaluate")


@flow(name="evaluate")
def evaluate_flow(seed: int, evaluate: EvaluateParams, mlflow: MlflowParams) -> dict:
    logger = get_run_logger()
    prepared = load_prepared(PREPARED_DIR)
    variants = load_variants(
        (TEACHER, TEACHER_ONNX), (STUDENT, STUDENT_FP32_ONNX), STUDENT_INT8, evaluate.num_threads
    )
    sizes = (STUDENT_FP32_ONNX.stat().st_size, STUDENT_INT8.stat().st_size)
    scored = score_variants(variants, prepared, evaluate, seed, sizes, PREPARED_DIR, logger)
    with atomic_dir(CONFUSION_DIR) as confusion_dir, atomic_dir(EVALUATION_DIR) as report_dir:
        files = write_evaluation_files(
            scored, variants, prepared, evaluate, seed, confusion_dir, report_dir, logger
        )
        # Logged before the folders are swapped in, while the files are where `files` says.
        track_variants(
            variants, scored.results, files, prepared.classes, evaluate, mlflow.experiment
        )
    write_metrics(METRICS, scored.results)
    create_markdown_artifact(
        key="evaluate",
        markdown=comparison_markdown(scored.results),
        description="visionpipe variants",
    )
    return scored.results


if __name__ == "__main__":
    stage_main(evaluate_flow)
