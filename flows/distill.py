"""distill: teach the student from the frozen teacher into models/student.pt (MLflow-tracked).

Run: ``dvc repro distill`` (or ``python -m flows.distill``).
"""

from __future__ import annotations

from prefect import flow

from flows.prefect_api import stage_main
from flows.train import tracked_fit
from tasks import distill as t
from tasks.layout import STUDENT, TEACHER, curve_path, metrics_path
from tasks.params import AugmentParams, DistillParams, MlflowParams
from tasks.train import load_training_data


@flow(name="distill")
def distill_flow(
    seed: int, distill: DistillParams, augment: AugmentParams, mlflow: MlflowParams
) -> dict:
    data = load_training_data()
    teacher = t.load_teacher(TEACHER)
    return tracked_fit(
        lambda on_epoch: t.fit_student(data, teacher, distill, augment, seed, on_epoch),
        stage="distill",
        variant="student",
        data=data,
        params=distill,
        run_params={"seed": seed, **distill.flat("distill"), **augment.flat("augment")},
        experiment=mlflow.experiment,
        outputs=(STUDENT, metrics_path("distill"), curve_path("distill")),
        augment=augment,
        seed=seed,
    )


if __name__ == "__main__":
    stage_main(distill_flow)
