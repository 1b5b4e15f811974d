"""quantize: the student as int8 ONNX (PTQ; QAT if PTQ loses too much): models/student_int8.onnx.

Run: ``dvc repro quantize`` (or ``python -m flows.quantize``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from flows.prefect_api import stage_main
from tasks.artifacts import atomic_path
from tasks.data.datasets import load_prepared
from tasks.export import quantize as t
from tasks.layout import PREPARED_DIR, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8, metrics_path
from tasks.params import QuantizeParams

METRICS = metrics_path("quantize")


@flow(name="quantize")
def quantize_flow(seed: int, quantize: QuantizeParams) -> dict:
    logger = get_run_logger()
    prepared = load_prepared(PREPARED_DIR)
    student = t.load_student(STUDENT)
    calibration = t.calibration_set(prepared.train, student, quantize.calibration_size, seed)
    t.export_student(student, STUDENT_FP32_ONNX)
    with tempfile.TemporaryDirectory() as scratch:
        candidates = {"ptq": Path(scratch) / "ptq.onnx"}
        t.quantize_onnx(STUDENT_FP32_ONNX, candidates["ptq"], calibration, quantize, "ptq")
        checks = {"ptq": t.check_int8(student, candidates["ptq"], prepared.val)}
        logger.info("quantize: PTQ val f1_macro drop %.4f", checks["ptq"].drop)
        if t.needs_qat(quantize.method, checks["ptq"], quantize.max_drop):
            tuned = t.qat_student(student, prepared.train, quantize, seed, Path(scratch))
            candidates["qat"] = Path(scratch) / "qat.onnx"
            t.quantize_onnx(tuned, candidates["qat"], calibration, quantize, "qat")
            checks["qat"] = t.check_int8(student, candidates["qat"], prepared.val)
            logger.info("quantize: QAT val f1_macro drop %.4f", checks["qat"].drop)
        chosen = t.pick(quantize.method, checks["ptq"], checks.get("qat"))
        with atomic_path(STUDENT_INT8) as tmp:
            shutil.copyfile(candidates[chosen], tmp)
    metrics = t.write_metrics(
        METRICS, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8, checks, chosen, quantize
    )
    logger.info(
        "quantize (%s, %s used): %s -> %s bytes (%.2fx), val f1_macro %.4f -> %.4f, "
        "top-1 agreement %.4f",
        quantize.method, chosen, metrics["fp32_onnx_bytes"], metrics["int8_onnx_bytes"],
        metrics["size_ratio"], metrics["val_f1_macro_fp32"], metrics["val_f1_macro_int8"],
        metrics["top1_agreement"],
    )  # fmt: skip
    return metrics


if __name__ == "__main__":
    stage_main(quantize_flow)
