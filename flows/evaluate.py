"""evaluate: teacher, student and int8 student on the test split; one MLflow run per variant.

Latency is measured first, every runtime of every variant back to back, then
the scores; the int8 model's compression targets are checked against the student.

Run: ``dvc repro evaluate`` (or ``python -m flows.evaluate``).
"""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.prefect_api import stage_main
from tasks import tracking
from tasks.artifacts import atomic_dir, atomic_path
from tasks.data.baselines import read_baselines
from tasks.data.datasets import load_prepared
from tasks.evaluation import evaluate as t
from tasks.evaluation import plots, report
from tasks.evaluation.results import BASELINES, ORT_INT8, RUNTIME_VERSIONS, runtime_versions
from tasks.evaluation.robustness import corrupted_sets
from tasks.evaluation.variants import load_variants, measure_variants_latency
from tasks.layout import (
    CONFUSION_DIR,
    EVALUATION_DIR,
    PREPARED_DIR,
    STUDENT,
    STUDENT_FP32_ONNX,
    STUDENT_INT8,
    TEACHER,
    metrics_path,
)
from tasks.params import EvaluateParams, MlflowParams

METRICS = metrics_path("evaluate")


@flow(name="evaluate")
def evaluate_flow(seed: int, evaluate: EvaluateParams, mlflow: MlflowParams) -> dict:
    logger = get_run_logger()
    prepared = load_prepared(PREPARED_DIR)
    labels = prepared.test.labels
    variants = load_variants(
        TEACHER, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8, evaluate.num_threads
    )
    for variant in variants:
        if variant.classes != prepared.classes:
            raise ValueError(
                f"{variant.artifact} was trained on other classes than data/prepared holds: "
                "re-run the pipeline (dvc repro)"
            )
    # Before anything else loads the CPU, and all runtimes together, so they compare fairly.
    latency = measure_variants_latency(variants, prepared.test.images, evaluate)
    corrupted = corrupted_sets(prepared.test.images, seed) if evaluate.robustness else None
    evaluations: dict[str, t.Evaluation] = {}
    for variant in variants:
        evaluation = t.evaluate_variant(
            variant, prepared.test, prepared.val, evaluate, seed, latency[variant.name], corrupted
        )
        evaluations[variant.name] = evaluation
        m = evaluation.metrics
        logger.info(
            "%s: f1_macro %.4f [%.4f, %.4f], accuracy %.4f, ECE %.4f -> %.4f (T=%.2f), "
            "%s params, %s bytes",
            variant.name, m["f1_macro"], *m["f1_macro_ci"], m["accuracy"], m["ece"],
            m["ece_temperature_scaled"], m["temperature"], variant.params, m["size_bytes"],
        )  # fmt: skip
        for runtime, r in latency[variant.name].items():
            logger.info(
                "%s in %s: %.3f ms (p95 %.3f) at batch 1, %.3f ms at batch 64 (%.0f images/s)%s",
                variant.name, runtime, r.latency_ms_b1, r.p95_ms_b1, r.latency_ms_b64,
                r.throughput_ips_b64, " <- fastest, reported" if runtime == m["runtime"] else "",
            )  # fmt: skip

    results = {name: dict(e.metrics) for name, e in evaluations.items()}
    targets = t.compression_targets(
        STUDENT_FP32_ONNX.stat().st_size,
        STUDENT_INT8.stat().st_size,
        latency["student"],
        latency["student_int8"][ORT_INT8],
        results["student"]["f1_macro"],
        results["student_int8"]["f1_macro"],
    )
    # Inside the int8 variant: consumers iterate the top-level keys as variants.
    results["student_int8"]["targets"] = targets
    for key, target in targets.items():
        logger.log(
            logging.INFO if target["met"] else logging.WARNING,
            "student_int8 target %s: %.4f, target <= %g: %s (against the %s)",
            key, target["value"], target["target"], "met" if target["met"] else "MISSED",
            target["reference"],
        )  # fmt: skip
    # What learning nothing scores on the same test split, beside the variants.
    found = read_baselines(PREPARED_DIR)
    results[BASELINES] = {name: found[name]["test"] for name in ("majority", "linear")}
    results[RUNTIME_VERSIONS] = runtime_versions()  # once, beside the runtime keys
    files: dict[str, list] = {}
    with atomic_dir(CONFUSION_DIR) as confusion_dir, atomic_dir(EVALUATION_DIR) as report_dir:
        for name, evaluation in evaluations.items():
            files[name] = [
                *plots.write_confusion(name, labels, evaluation.predicted, prepared.classes,
                                   confusion_dir),
                *plots.write_reports(name, evaluation, labels, prepared.classes,
                                 evaluate.calibration_bins, report_dir),
            ]  # fmt: skip
        for variant in variants:
            cam = plots.write_grad_cam(variant, evaluations[variant.name], prepared.test,
                                   evaluate.grad_cam_examples, seed, report_dir)  # fmt: skip
            files[variant.name] += [cam] if cam else []
        steps = t.compare_steps(
            evaluations, labels, prepared.classes, evaluate.bootstrap_samples, seed, report_dir
        )
        for candidate, (comparison, paths) in steps.items():
            results[candidate].update(comparison)
            files[candidate] += paths
            key, c = next(iter(comparison.items()))
            logger.info(
                "%s %s: f1_macro %+.4f [%+.4f, %+.4f], McNemar p %.3g",
                candidate, key, c["f1_macro_delta"], *c["f1_macro_delta_ci"], c["mcnemar_p"],
            )  # fmt: skip
        report_file = report_dir / "report.md"
        with atomic_path(report_file) as tmp:
            tmp.write_text(report.report_markdown(results, prepared.classes))
        # Logged before the folders are swapped in, while the files are where `files` says.
        for variant in variants:
            # the runtime its latency metrics come from: its fastest at batch 64
            tags = {
                "source_run_id": variant.source_run_id or "",
                "runtime": results[variant.name]["runtime"],
                **{f"{lib}_version": v for lib, v in results[RUNTIME_VERSIONS].items()},
            }
            with tracking.start_run(
                mlflow.experiment, variant.name, stage="evaluate", variant=variant.name,
                params={**variant.run_params, **evaluate.flat("evaluate")}, tags=tags,
            ) as run:  # fmt: skip
                tracking.log_results(
                    run.info.run_id,
                    {**results[variant.name], "baseline": results[BASELINES]},
                    [*files[variant.name], report_file],
                )
                tracking.log_results(run.info.run_id, {}, [variant.artifact], "model")
                # the per-class table, also as an MLflow table (shown in the artifact view)
                tracking.log_table(
                    run.info.run_id,
                    plots.per_class_rows(results[variant.name], prepared.classes),
                    "per_class.json",
                )

    t.write_metrics(METRICS, results)
    create_markdown_artifact(
        key="evaluate",
        markdown=report.comparison_markdown(results),
        description="visionpipe variants",
    )
    return results


if __name__ == "__main__":
    stage_main(evaluate_flow)
