"""train: fit the teacher CNN into models/teacher.pt (and models/teacher.onnx), tracked in MLflow.

Run: ``dvc repro train`` (or ``python -m flows.train``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.fitting import resumable, tracked_fit
from flows.prefect_api import stage_main
from tasks.data.baselines import read_baselines
from tasks.layout import PREPARED_DIR, TEACHER, TEACHER_ONNX, curve_path, metrics_path
from tasks.params import AugmentParams, MlflowParams, TrainParams
from tasks.training import train as t
from tasks.training.inputs import load_training_data


@flow(name="train")
def train_flow(seed: int, train: TrainParams, augment: AugmentParams, mlflow: MlflowParams) -> dict:
    data = load_training_data()
    run_params = run_parameters(seed, train, augment)
    resume = resumable("train", run_params, data)
    log = get_run_logger().info
    summary = tracked_fit(
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
    t.export_teacher(TEACHER, TEACHER_ONNX)
    return summary


def run_parameters(seed: int, train: TrainParams, augment: AugmentParams) -> dict:
    """What the teacher's MLflow run records as its params (and its resume state is keyed on)."""
    return {"seed": seed, **train.flat("train"), **augment.flat("augment")}


def train_worker(seed: int, train: TrainParams, augment: AugmentParams, mlflow: MlflowParams):
    """What a rank other than 0 does under torchrun: the same fit, resumed alike, no outputs."""
    data = load_training_data.fn()
    resume = resumable("train", run_parameters(seed, train, augment), data)
    return t.fit_teacher.fn(data, train, augment, seed, resume=resume)


if __name__ == "__main__":
    stage_main(train_flow, train_worker)
