"""quantize: int8 post-training static quantization of the student into models/student_int8.onnx.

Run: ``dvc repro quantize`` (or ``python -m flows.quantize``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks import quantize as t
from tasks.datasets import load_prepared
from tasks.layout import PREPARED_DIR, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8, metrics_path
from tasks.params import QuantizeParams

METRICS = metrics_path("quantize")


@flow(name="quantize")
def quantize_flow(seed: int, quantize: QuantizeParams) -> dict:
    prepared = load_prepared(PREPARED_DIR)
    student = t.load_student(STUDENT)
    calibration = t.calibration_set(prepared.train, student, quantize.calibration_size, seed)
    t.export_student(student, STUDENT_FP32_ONNX)
    t.quantize(STUDENT_FP32_ONNX, STUDENT_INT8, calibration, quantize)
    check = t.check_int8(student, STUDENT_INT8, prepared.val)
    metrics = t.write_metrics(METRICS, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8, check, quantize)
    get_run_logger().info(
        "quantize: %s -> %s bytes (%.2fx), val f1_macro %.4f -> %.4f, top-1 agreement %.4f",
        metrics["fp32_onnx_bytes"], metrics["int8_onnx_bytes"], metrics["size_ratio"],
        check.val_f1_macro_fp32, check.val_f1_macro_int8, check.top1_agreement,
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    stage_main(quantize_flow)
