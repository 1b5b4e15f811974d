"""train: fit the teacher CNN into models/teacher.pt, tracked as an MLflow run.

Run: ``dvc repro train`` (or ``python -m flows.train``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks import tracking
from tasks import train as t
from tasks.baselines import check_fit, read_baselines
from tasks.engine import EpochRecord, FitResult
from tasks.layout import PREPARED_DIR, TEACHER, curve_path, metrics_path
from tasks.params import AugmentParams, FitParams, MlflowParams, TrainParams
from tasks.resume import Resume, fingerprint, resume_path


def tracked_fit(
    fit_model: Callable[[Callable[[EpochRecord], None]], FitResult],
    *,
    stage: str,
    variant: str,
    data: t.TrainingData,
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

    With ``baselines`` (``data/prepared/baselines.json``) the fit must beat them
    (``tasks.baselines.check_fit``) before anything is written: a model that
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
            logger.info(t.describe_epoch(record))

        result = fit_model(on_epoch)
        checked: dict[str, Any] = {}
        if baselines is not None:
            check = check_fit(
                stage, result.best_val_f1_macro, baselines, params.baseline_margin,
                params.allow_weak, logger.warning,
            )  # fmt: skip
            checked = check.metrics()
            tracking.set_tags(run_id, {"weak_model": str(check.weak).lower()})
        summary = t.write_model(
            result, data, params, run_params, checkpoint, metrics, curve, run_id,
            checked | (extra(result) if extra else {}),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            shown = t.augment_artifacts(data, augment, seed, Path(tmp))
            tracking.log_results(run_id, summary, [checkpoint, curve, *shown])
    logger.info(
        "%s: best epoch %s of %s, val f1_macro %.4f, %s params",
        stage, summary["best_epoch"], summary["epochs_run"], summary["best_val_f1_macro"],
        summary["params"],
    )  # fmt: skip
    return summary


def resumable(stage: str, run_params: dict[str, Any], data: t.TrainingData, *extra: Any) -> Resume:
    """Per-epoch state for ``stage``, valid only for these params and this data."""
    return Resume(resume_path(stage), fingerprint(run_params, data.describe(), *extra))


@flow(name="train")
def train_flow(seed: int, train: TrainParams, augment: AugmentParams, mlflow: MlflowParams) -> dict:
    data = t.load_training_data()
    run_params = {"seed": seed, **train.flat("train"), **augment.flat("augment")}
    resume = resumable("train", run_params, data)
    log = get_run_logger().info
    return tracked_fit(
        lambda on_epoch: t.fit_teacher(data, train, augment, seed, on_epoch, resume, log),
        stage="train",
        variant="teacher",
        data=data,
        params=train,
        run_params=run_params,
        experiment=mlflow.experiment,
        outputs=(TEACHER, metrics_path("train"), curve_path("train")),
        augment=augment,
        seed=seed,
        baselines=read_baselines(PREPARED_DIR),
    )


def train_worker(seed: int, train: TrainParams, augment: AugmentParams, mlflow: MlflowParams):
    """What a rank other than 0 does under torchrun: the same fit, no outputs."""
    data = t.load_training_data.fn()
    return t.fit_teacher.fn(data, train, augment, seed)


if __name__ == "__main__":
    stage_main(train_flow, train_worker)
