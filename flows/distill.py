"""distill: teach the student from the frozen teacher into models/student.pt (MLflow-tracked).

With ``distill.compare_scratch`` the same student is first trained without the
teacher (same initial weights, same batches): its own MLflow run
(``student_scratch``), and ``kd_gain`` = distilled minus scratch macro-F1 on
the test split in ``metrics/distill.json``, the checkpoint and both runs.

Run: ``dvc repro distill`` (or ``python -m flows.distill``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from flows.fitting import resumable, tracked_fit
from flows.prefect_api import stage_main
from tasks.data.baselines import read_baselines
from tasks.layout import PREPARED_DIR, STUDENT, TEACHER, curve_path, metrics_path
from tasks.params import AugmentParams, DistillParams, MlflowParams
from tasks.training import distill as t
from tasks.training.inputs import load_training_data


@flow(name="distill")
def distill_flow(
    seed: int, distill: DistillParams, augment: AugmentParams, mlflow: MlflowParams
) -> dict:
    data = load_training_data()
    teacher = t.load_teacher(TEACHER)
    log = get_run_logger().info
    run_params = run_parameters(seed, distill, augment)
    teacher_id = [teacher.mlflow_run_id, teacher.metrics]
    common = {
        "data": data,
        "params": distill,
        "run_params": run_params,
        "experiment": mlflow.experiment,
        "augment": augment,
        "seed": seed,
    }

    def test_score(result) -> t.SplitScore:
        return t.score(result.model, data, "test", distill.batch_size)

    scratch: t.SplitScore | None = None
    if distill.compare_scratch:
        # The scratch student is a yardstick, not a pipeline output: its files
        # live in its MLflow run only.
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)

            def scratch_extra(result) -> dict:
                nonlocal scratch
                scratch = test_score(result)
                return {"test_f1_macro": scratch.f1_macro, "test_accuracy": scratch.accuracy}

            tracked_fit(
                lambda on_epoch: t.fit_student(
                    data, None, distill, augment, seed, on_epoch,
                    resumable("distill_scratch", run_params, data), log,
                ),
                stage="distill", variant="student_scratch", run_name="distill_scratch",
                outputs=(out / "student_scratch.pt", out / "metrics.json", out / "curve.csv"),
                extra=scratch_extra, **common,
            )  # fmt: skip

    def distilled_extra(result) -> dict:
        distilled = test_score(result)
        numbers = {"test_f1_macro": distilled.f1_macro, "test_accuracy": distilled.accuracy}
        if scratch is None:
            return numbers
        classes = data.prepared.num_classes
        return numbers | t.kd_gain(distilled, scratch, classes, distill.bootstrap_samples, seed)

    summary = tracked_fit(
        lambda on_epoch: t.fit_student(
            data, teacher, distill, augment, seed, on_epoch,
            resumable("distill", run_params, data, teacher_id), log,
        ),
        stage="distill", variant="student",
        outputs=(STUDENT, metrics_path("distill"), curve_path("distill")),
        extra=distilled_extra, baselines=read_baselines(PREPARED_DIR), **common,
    )  # fmt: skip
    if scratch is not None:
        get_run_logger().info(
            "distill: test f1_macro %.4f distilled vs %.4f from scratch: kd_gain %+.4f "
            "(95%% paired bootstrap %+.4f to %+.4f)",
            summary["test_f1_macro"], scratch.f1_macro, summary["kd_gain"], *summary["kd_gain_ci"],
        )  # fmt: skip
    return summary


def run_parameters(seed: int, distill: DistillParams, augment: AugmentParams) -> dict:
    """What the students' MLflow runs record as params (and their resume states are keyed on)."""
    return {"seed": seed, **distill.flat("distill"), **augment.flat("augment")}


def distill_worker(seed: int, distill: DistillParams, augment: AugmentParams, mlflow: MlflowParams):
    """A rank other than 0 under torchrun: the same fits in the same order, resumed alike,
    no outputs."""
    data = load_training_data.fn()
    run_params = run_parameters(seed, distill, augment)
    if distill.compare_scratch:
        scratch = resumable("distill_scratch", run_params, data)
        t.fit_student.fn(data, None, distill, augment, seed, resume=scratch)
    teacher = t.load_teacher.fn(TEACHER)
    resume = resumable("distill", run_params, data, [teacher.mlflow_run_id, teacher.metrics])
    return t.fit_student.fn(data, teacher, distill, augment, seed, resume=resume)


if __name__ == "__main__":
    stage_main(distill_flow, distill_worker)
