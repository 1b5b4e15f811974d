"""The evaluate stage's three steps, called in order by ``flows/evaluate.py``.

- ``score_variants``: latency first (every runtime of every variant back to
  back, before anything else loads the CPU), then each variant scored on the
  test split, the int8 model's compression targets and budget, the trivial baselines and
  the runtime versions: the content of ``metrics/evaluate.json``;
- ``write_evaluation_files``: confusion matrices, per-variant reports and
  Grad-CAM, each compression step's paired comparison, and ``report.md``;
- ``track_variants``: one MLflow run per variant, with those files and the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.artifacts import atomic_path
from tasks.data.baselines import read_baselines
from tasks.data.datasets import PreparedData
from tasks.evaluation import evaluate as t
from tasks.evaluation import plots, report
from tasks.evaluation.results import BASELINES, ORT_INT8, RUNTIME_VERSIONS, runtime_versions
from tasks.evaluation.robustness import corrupted_sets
from tasks.evaluation.variants import Variant, measure_variants_latency
from tasks.params import EvaluateParams

Logger = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class Scored:
    """What ``score_variants`` found: each variant's evaluation, and the metrics file's content."""

    evaluations: dict[str, t.Evaluation]
    results: dict[str, dict[str, Any]]


def check_classes(variants: list[Variant], prepared: PreparedData) -> None:
    for variant in variants:
        if variant.classes != prepared.classes:
            raise ValueError(
                f"{variant.artifact} was trained on other classes than data/prepared holds: "
                "re-run the pipeline (dvc repro)"
            )


def score_variants(
    variants: list[Variant],
    prepared: PreparedData,
    evaluate: EvaluateParams,
    seed: int,
    sizes: tuple[int, int],
    prepared_dir: Path,
    logger: Logger,
) -> Scored:
    """Latency, scores, compression targets (``sizes``: the fp32 and int8 ONNX files'
    bytes), baselines and runtime versions for every variant."""
    check_classes(variants, prepared)
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
    targets = {
        **t.compression_targets(
            *sizes,
            latency["student"],
            latency["student_int8"][ORT_INT8],
            results["student"]["f1_macro"],
            results["student_int8"]["f1_macro"],
        ),
        **t.student_budget(
            sizes[1],
            latency["teacher"],
            latency["student_int8"][ORT_INT8],
            evaluate.student_budget,
        ),
    }
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
    found = read_baselines(prepared_dir)
    results[BASELINES] = {name: found[name]["test"] for name in ("majority", "linear")}
    results[RUNTIME_VERSIONS] = runtime_versions()  # once, beside the runtime keys
    return Scored(evaluations, results)


def write_evaluation_files(
    scored: Scored,
    variants: list[Variant],
    prepared: PreparedData,
    evaluate: EvaluateParams,
    seed: int,
    confusion_dir: Path,
    report_dir: Path,
    logger: Logger,
) -> dict[str, list[Path]]:
    """Every file of the evaluation, per variant (``report.md`` last, shared); each
    compression step's paired comparison is added to ``scored.results``."""
    labels, classes, results = prepared.test.labels, prepared.classes, scored.results
    files: dict[str, list[Path]] = {}
    for name, evaluation in scored.evaluations.items():
        files[name] = [
            *plots.write_confusion(name, labels, evaluation.predicted, classes, confusion_dir),
            *plots.write_reports(name, evaluation, labels, classes, evaluate.calibration_bins,
                                 report_dir),
        ]  # fmt: skip
    for variant in variants:
        cam = plots.write_grad_cam(variant, scored.evaluations[variant.name], prepared.test,
                                   evaluate.grad_cam_examples, seed, report_dir)  # fmt: skip
        files[variant.name] += [cam] if cam else []
    steps = t.compare_steps(
        scored.evaluations, labels, classes, evaluate.bootstrap_samples, seed, report_dir
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
        tmp.write_text(report.report_markdown(results, classes))
    for name in files:
        files[name].append(report_file)
    return files


def track_variants(
    variants: list[Variant],
    results: dict[str, dict[str, Any]],
    files: dict[str, list[Path]],
    classes: tuple[str, ...],
    evaluate: EvaluateParams,
    experiment: str,
) -> None:
    """One MLflow run per variant: its metrics (and the baselines), files, model and
    per-class table, tagged with the runtime its latency comes from."""
    for variant in variants:
        tags = {
            "source_run_id": variant.source_run_id or "",
            "runtime": results[variant.name]["runtime"],  # its fastest at batch 64
            **{f"{lib}_version": v for lib, v in results[RUNTIME_VERSIONS].items()},
        }
        with tracking.start_run(
            experiment, variant.name, stage="evaluate", variant=variant.name,
            params={**variant.run_params, **evaluate.flat("evaluate")}, tags=tags,
        ) as run:  # fmt: skip
            run_id = run.info.run_id
            tracking.log_results(
                run_id, {**results[variant.name], "baseline": results[BASELINES]},
                files[variant.name],
            )  # fmt: skip
            tracking.log_results(run_id, {}, [variant.artifact], "model")
            # the per-class table, also as an MLflow table (shown in the artifact view)
            tracking.log_table(
                run_id, plots.per_class_rows(results[variant.name], classes), "per_class.json"
            )
