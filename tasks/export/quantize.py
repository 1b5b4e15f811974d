"""Quantize stage: int8 post-training static quantization of the student, as ONNX.

Run with ``dvc repro quantize`` (or ``python -m flows.quantize``). Reads
``seed`` and ``quantize``; needs ``models/student.pt`` and the prepared data.
Writes ``models/student.onnx`` (fp32 reference export),
``models/student_int8.onnx`` (the deployable int8 model) and
``metrics/quantize.json``.

Why ONNX Runtime rather than ``torch.ao.quantization``: the latter is
deprecated upstream (its PT2E successor lives in torchao), whereas ONNX with
QuantizeLinear/DequantizeLinear (QDQ) nodes is a standard, versioned format
that any ONNX Runtime (server, mobile, browser) runs with integer kernels. It
was also the fastest int8 path measured on these machines (benchmarks/quantize_latency.py).

Steps: export the fp32 student with the dynamo exporter (Conv-BN folds into
one conv; ORT fuses each conv with its ReLU when it builds the int8 kernels),
let ORT's pre-processing run shape inference and graph optimisation,
calibrate activation ranges on ``quantize.calibration_size`` train images
(normalised exactly as at inference), then write int8 weights (per-channel
when ``quantize.per_channel``) and uint8 activations. The first conv stays
float with ``quantize.keep_first_conv_fp32``: on 1-3 input channels ORT's
int8 conv is several times slower than its fp32 one (measured in
``benchmarks/quantize_latency.py``), and it holds a negligible share of the weights.
So does a pretrained student's input resize, which loses accuracy in uint8.

``quantize.method``: ``ptq`` stops there; ``qat`` fine-tunes with simulated
int8 first (``tasks/export/qat.py``) and quantizes the result the same way;
``auto`` runs PTQ and, only when its val macro-F1 drop exceeds
``quantize.max_drop``, QAT too, keeping whichever int8 model scores higher
on the validation split. ``metrics/quantize.json`` says which won and why.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from tasks.artifacts import atomic_path, write_json
from tasks.checkpoints import Checkpoint, load_checkpoint
from tasks.data.datasets import Split
from tasks.data.pixels import normalise
from tasks.export.onnx_io import (
    INPUT_NAME,
    export_checkpoint,
    export_onnx,
    finalise_onnx,
    input_shape,
    model_metadata,
    torch_logits,
)
from tasks.export.qat import qat_finetune
from tasks.inference import onnx_logits, onnx_session
from tasks.metrics import f1_macro
from tasks.orchestration import stage_task
from tasks.params import QuantizeParams

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds normalised images to ORT's calibrator in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self.images = images
        self.batch_size = batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.position = 0


def first_conv(path: Path) -> str:
    """The name of the first Conv node (graphs are stored in topological order)."""
    return next(node.name for node in onnx.load(path).graph.node if node.op_type == "Conv")


def resize_nodes(path: Path) -> list[str]:
    """The names of the Resize nodes, which stay float (see quantize_onnx)."""
    return [node.name for node in onnx.load(path).graph.node if node.op_type == "Resize"]


@stage_task(name="quantize-int8")
def quantize_onnx(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    params: QuantizeParams,
    method: str = "ptq",
) -> Path:
    """Static int8 quantization (QDQ; int8 weights, uint8 activations) calibrated on images.

    uint8 activations with int8 weights (U8S8) is the combination ORT's x86
    kernels are built for; S8S8 measured no faster here.
    """
    metadata = {p.key: p.value for p in onnx.load(fp32_path).metadata_props}
    with tempfile.TemporaryDirectory() as scratch, atomic_path(int8_path) as tmp:
        prepared = Path(scratch) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        excluded = [first_conv(prepared)] if params.keep_first_conv_fp32 else []
        # A pretrained network's input view upsamples the image (Resize): in uint8 that
        # cost the EfficientNet-Lite0 trunk student 10 points of val macro-F1 on digits
        # (1.00 -> 0.90; 0.92 -> 0.58 on Fashion-MNIST-300), in float nothing.
        excluded += resize_nodes(prepared)
        quantize_static(
            str(prepared),
            str(tmp),
            ArrayCalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=params.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[params.calibration_method],
            nodes_to_exclude=excluded,
        )
        quantization = {**params.model_dump(), "method_used": method}
        finalise_onnx(tmp, {**metadata, "quantization": json.dumps(quantization)})
    return int8_path


@stage_task(name="load-student")
def load_student(path: Path) -> Checkpoint:
    return load_checkpoint(path)


@stage_task(name="calibration-set")
def calibration_set(train: Split, checkpoint: Checkpoint, size: int, seed: int) -> np.ndarray:
    """``size`` train images drawn without replacement, normalised as at inference."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train), size=min(size, len(train)), replace=False))
    return normalise(train.images[rows], checkpoint.stats)


@stage_task(name="export-onnx")
def export_student(checkpoint: Checkpoint, path: Path) -> Path:
    return export_checkpoint(checkpoint, path)


@stage_task(name="quantization-aware-training")
def qat_student(
    checkpoint: Checkpoint, train: Split, params: QuantizeParams, seed: int, out_dir: Path
) -> Path:
    """Fine-tune with simulated int8 (``tasks/export/qat.py``); the fp32 ONNX of the result."""
    tuned = qat_finetune(
        checkpoint.build(),
        train,
        checkpoint.stats,
        epochs=params.qat_epochs,
        lr=params.qat_lr,
        batch_size=params.qat_batch_size,
        seed=seed,
        skip_first_conv=params.keep_first_conv_fp32,
    )
    path = out_dir / "student_qat.onnx"
    return export_onnx(tuned, input_shape(checkpoint), path, model_metadata(checkpoint))


@dataclass(frozen=True)
class QuantizationCheck:
    """How an int8 model compares with the fp32 student on the validation split."""

    val_f1_macro_fp32: float
    val_f1_macro_int8: float
    top1_agreement: float
    max_abs_logit_diff: float

    @property
    def drop(self) -> float:
        return self.val_f1_macro_fp32 - self.val_f1_macro_int8


@stage_task(name="check-int8")
def check_int8(checkpoint: Checkpoint, int8_path: Path, val: Split) -> QuantizationCheck:
    images = normalise(val.images, checkpoint.stats)
    fp32 = torch_logits(checkpoint.build(), images, batch_size=256)
    int8 = onnx_logits(onnx_session(int8_path, threads=1), images, batch_size=256)
    num_classes = len(checkpoint.classes)
    return QuantizationCheck(
        val_f1_macro_fp32=f1_macro(val.labels, fp32.argmax(1), num_classes),
        val_f1_macro_int8=f1_macro(val.labels, int8.argmax(1), num_classes),
        top1_agreement=float((fp32.argmax(1) == int8.argmax(1)).mean()),
        max_abs_logit_diff=float(np.abs(fp32 - int8).max()),
    )


def needs_qat(method: str, ptq: QuantizationCheck, max_drop: float) -> bool:
    """``qat`` always; ``auto`` only when PTQ lost more than ``max_drop`` val macro-F1."""
    return method == "qat" or (method == "auto" and ptq.drop > max_drop)


def pick(method: str, ptq: QuantizationCheck, qat: QuantizationCheck | None) -> str:
    """The int8 model that ships: QAT's under ``qat``; under ``auto`` the one with the
    higher val macro-F1, PTQ on a tie (it is the simpler of the two)."""
    if qat is None:
        return "ptq"
    if method == "qat":
        return "qat"
    return "qat" if qat.val_f1_macro_int8 > ptq.val_f1_macro_int8 else "ptq"


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type a model has: shows what was quantized and fused."""
    counts: dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


@stage_task(name="write-quantize-metrics")
def write_metrics(
    path: Path, student_path: Path, fp32_path: Path, int8_path: Path,
    checks: dict[str, QuantizationCheck], chosen: str, params: QuantizeParams,
) -> dict:  # fmt: skip
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    check = checks[chosen]
    metrics = {
        "method": params.method,
        "method_used": chosen,
        "student_pt_bytes": student_path.stat().st_size,
        "fp32_onnx_bytes": fp32_bytes,
        "int8_onnx_bytes": int8_bytes,
        "size_ratio": round(int8_bytes / fp32_bytes, 4),
        "val_f1_macro_fp32": check.val_f1_macro_fp32,
        "val_f1_macro_int8": check.val_f1_macro_int8,
        "val_f1_drop": check.drop,
        "top1_agreement": check.top1_agreement,
        "max_abs_logit_diff": check.max_abs_logit_diff,
        **{f"{name}_val_f1_macro_int8": c.val_f1_macro_int8 for name, c in checks.items()},
        "max_drop": params.max_drop,
        "calibration_size": params.calibration_size,
        "calibration_method": params.calibration_method,
        "per_channel": params.per_channel,
        "keep_first_conv_fp32": params.keep_first_conv_fp32,
        "fp32_ops": op_counts(fp32_path),
        "int8_ops": op_counts(int8_path),
    }
    write_json(path, metrics)
    return metrics
