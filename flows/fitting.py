"""What the train and distill flows share: a fit tracked as an MLflow run, and its resume state.

``tracked_fit`` wraps one fit (the teacher's, the scratch or the taught
student's) in its MLflow run, checks it against the baselines, and writes its
checkpoint, metrics and curve; ``resumable`` names the per-epoch state a
killed fit continues from. Used by ``flows/train.py`` and ``flows/distill.py``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from tasks import tracking
from tasks.data.baselines import Selection, check_fit
from tasks.params import AugmentParams, FitParams, Keep
from tasks.training.engine import EpochRecord, FitResult
from tasks.training.inputs import TrainingData
from tasks.training.outputs import augment_artifacts, describe_epoch, write_model
from tasks.training.resume import Resume, fingerprint, resume_path


def tracked_fit(
    fit_model: Callable[[Callable[[EpochRecord], None]], FitResult],
    *,
    stage: str,
    variant: str,
    data: TrainingData,
    params: FitParams,
    run_params: dict[str, Any],
    experiment: str,
    outputs: tuple[Path, Path, Path],
    augment: AugmentParams,
    seed: int,
    extra: Callable[[FitResult], dict[str, Any]] | None = None,
    run_name: str | None = None,
    baselines: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fit_model`` inside an MLflow run: curves per epoch, then checkpoint and metrics.

    With ``baselines`` (``data/prepared/baselines.json``) the fit must beat them, by
    a margin and beyond the luck of choosing among its epochs
    (``tasks.data.baselines.check_fit``), before anything is written: a model that
    learned nothing fails the stage, or with ``allow_weak`` ships tagged
    ``weak_model`` and with ``weak: true`` in its metrics.

    The run also gets the exact augmentation pipelines (``augment.yaml``) and a
    grid of augmented train images (``augment_grid.png``). ``extra`` adds
    numbers computed from the fitted model to the summary (and so to the
    metrics file, the checkpoint and the MLflow run).
    """
    logger = get_run_logger()
    checkpoint, metrics, curve = outputs
    with tracking.start_run(
        experiment, run_name or stage, stage=stage, variant=variant, params=run_params
    ) as run:
        run_id = run.info.run_id
        if data.resample_warnings:  # the resample stage has no run of its own: say it here
            tracking.set_tags(run_id, {"resample_warnings": " | ".join(data.resample_warnings)})
            for warning in data.resample_warnings:
                logger.warning("resample: %s", warning)

        def on_epoch(record: EpochRecord) -> None:
            tracking.log_epoch(run_id, record)
            logger.info(describe_epoch(record))

        result = fit_model(on_epoch)
        checked: dict[str, Any] = {}
        if baselines is not None:
            kept = kept_checkpoint(result, data, params.keep)
            check = check_fit(
                stage, kept, baselines, params.baseline_margin, params.significance,
                params.allow_weak, logger.warning,
            )  # fmt: skip
            checked = check.metrics()
            tracking.set_tags(run_id, {"weak_model": str(check.weak).lower()})
        summary = write_model(
            result, data, params, run_params, checkpoint, metrics, curve, run_id,
            checked | (extra(result) if extra else {}),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            shown = augment_artifacts(data, augment, seed, Path(tmp))
            tracking.log_results(run_id, summary, [checkpoint, curve, *shown])
    logger.info(
        "%s: best epoch %s of %s, val f1_macro %.4f, %s params",
        stage, summary["best_epoch"], summary["epochs_run"], summary["best_val_f1_macro"],
        summary["params"],
    )  # fmt: skip
    return summary


def kept_checkpoint(result: FitResult, data: TrainingData, keep: Keep) -> Selection:
    """What the guard weighs: the kept epoch's val scores, chosen from every epoch run
    (``keep: best``) or from none (``keep: last``: the schedule's end, whatever val said)."""
    (kept,) = [record for record in result.history if record.epoch == result.best_epoch]
    looks = 1 if keep == "last" else len(result.history)
    return Selection.of(kept.val_f1_macro, kept.val_accuracy, data.prepared.val.labels, looks)


def resumable(stage: str, run_params: dict[str, Any], data: TrainingData, *extra: Any) -> Resume:
    """Per-epoch state for ``stage``, valid only for these params and this data."""
    return Resume(resume_path(stage), fingerprint(run_params, data.describe(), *extra))
