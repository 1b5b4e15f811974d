"""Every path dvc.yaml declares, in one place (tests/test_dvc_yaml.py keeps the two in step)."""

from __future__ import annotations

from pathlib import Path

AUDIT_DIR = Path("data/audit")  # embeddings.npy, groups.json (read by prepare)
AUDIT_REPORT = Path("reports/audit.json")
AUDIT_GALLERY_DIR = Path("reports/audit")
PREPARED_DIR = Path("data/prepared")
RESAMPLED_DIR = Path("data/resampled")
TEACHER = Path("models/teacher.pt")
# The teacher in ONNX, exported once by train: evaluate times it, the registry registers it.
TEACHER_ONNX = Path("models/teacher.onnx")
STUDENT = Path("models/student.pt")
STUDENT_FP32_ONNX = Path("models/student.onnx")
STUDENT_INT8 = Path("models/student_int8.onnx")
DATA_QUALITY = Path("reports/data_quality.json")
CONFUSION_DIR = Path("reports/confusion")
EVALUATION_DIR = Path("reports/evaluation")


def metrics_path(stage: str) -> Path:
    return Path("metrics") / f"{stage}.json"


def curve_path(stage: str) -> Path:
    return Path("plots") / f"{stage}_curve.csv"
