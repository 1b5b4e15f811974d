"""The MLflow model registry: the three variants as ONNX models, and the champion rule.

Every variant is registered as ``visionpipe-<variant>`` in the
ONNX flavour: the int8 and fp32 students are the files ``quantize`` wrote, the
teacher is exported from its checkpoint the way ``evaluate`` times it. ONNX
rather than the PyTorch flavour because a served model should need neither
this repository's code nor torch: ``mlflow.pyfunc.load_model(
"models:/visionpipe-student_int8@champion")`` runs it with ONNX Runtime alone.
Each model carries an input/output signature (``images`` float32 N x C x H x W,
already normalised; ``logits`` N x classes) and, in its MLmodel metadata, the
classes, the normalisation statistics and the preprocessing (``ImageSpec``)
that turns an image file into that input: the same facts ``visionpipe predict``
reads from the ONNX file itself.

A version is only created for a file whose content is new: each version is
tagged with the md5 of the file DVC tracks (``source_md5``), so re-running the
retrain flow with nothing changed registers nothing.

The promotion rule is :func:`decide`, a pure function of the numbers, so the
flow, its tests and the logged decision agree on what "better" means.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from tasks.checkpoints import load_checkpoint
from tasks.data.datasets import Split
from tasks.data.pixels import ChannelStats, normalise
from tasks.export.onnx_io import INPUT_NAME, OUTPUT_NAME, export_onnx, input_shape, model_metadata
from tasks.layout import STUDENT_FP32_ONNX, STUDENT_INT8, TEACHER
from tasks.metrics import f1_macro
from tasks.params import PromoteParams

MODEL_PREFIX = "visionpipe-"
CHAMPION = "champion"
CHALLENGER = "student_int8"
# The file DVC tracks for each variant: what source_md5 hashes.
VARIANT_FILES: dict[str, Path] = {
    "teacher": TEACHER,
    "student": STUDENT_FP32_ONNX,
    "student_int8": STUDENT_INT8,
}
# Copied from metrics/evaluate.json onto each version, so the registry UI shows them.
VERSION_METRICS = ("f1_macro", "accuracy", "size_bytes", "latency_ms_b1", "latency_ms_b64")


def model_name(variant: str) -> str:
    return f"{MODEL_PREFIX}{variant}"


def champion_uri(variant: str = CHALLENGER) -> str:
    return f"models:/{model_name(variant)}@{CHAMPION}"


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: the hash DVC records for it in ``dvc.lock``."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_model(variant: str, path: Path, scratch: Path) -> onnx.ModelProto:
    """The ONNX graph registered for ``variant``: the teacher is exported from its checkpoint."""
    if path.suffix == ".onnx":
        return onnx.load(str(path))
    checkpoint = load_checkpoint(path)
    exported = export_onnx(
        checkpoint.build(),
        input_shape(checkpoint),
        scratch / f"{variant}.onnx",
        model_metadata(checkpoint, variant=variant),
    )
    return onnx.load(str(exported))


def describe(model: onnx.ModelProto) -> dict[str, Any]:
    """Classes, normalisation and preprocessing from a visionpipe ONNX file's metadata."""
    meta = {entry.key: entry.value for entry in model.metadata_props}
    missing = [key for key in ("classes", "mean", "std", "preprocessing") if key not in meta]
    if missing:
        raise ValueError(f"not a visionpipe export: no {', '.join(missing)} in its metadata")
    return {
        "classes": json.loads(meta["classes"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "preprocessing": json.loads(meta["preprocessing"]),
    }


def signature(description: Mapping[str, Any]) -> ModelSignature:
    """``images`` (N, C, H, W) float32, normalised -> ``logits`` (N, classes) float32."""
    spec = description["preprocessing"]
    size, channels = int(spec["image_size"]), int(spec["channels"])
    images = TensorSpec(np.dtype(np.float32), (-1, channels, size, size), INPUT_NAME)
    logits = TensorSpec(np.dtype(np.float32), (-1, len(description["classes"])), OUTPUT_NAME)
    return ModelSignature(inputs=Schema([images]), outputs=Schema([logits]))


def find_version(client: mlflow.MlflowClient, name: str, md5: str) -> ModelVersion | None:
    """The version of ``name`` registered from a file with this md5, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if v.tags.get("source_md5") == md5]
    return max(matches, key=lambda v: int(v.version)) if matches else None


@dataclass(frozen=True)
class Registered:
    """One variant's model version, and whether this call created it."""

    variant: str
    name: str
    version: str
    created: bool

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_variants(
    files: Mapping[str, Path],
    metrics: Mapping[str, Mapping[str, Any]],
    tags: Mapping[str, str],
) -> dict[str, Registered]:
    """Register each variant's file as an ONNX model version, unless its content already is.

    Must run inside an active MLflow run (the models are logged to it). ``tags``
    (git commit, data hash) and the variant's test metrics go on each new version.
    """
    client = mlflow.MlflowClient()
    registered: dict[str, Registered] = {}
    with tempfile.TemporaryDirectory(prefix="visionpipe-register-") as scratch:
        for variant, path in files.items():
            name, md5 = model_name(variant), file_md5(path)
            if (existing := find_version(client, name, md5)) is not None:
                version = str(existing.version)
                registered[variant] = Registered(variant, name, version, created=False)
                continue
            model = onnx_model(variant, path, Path(scratch))
            description = describe(model)
            info = mlflow.onnx.log_model(
                model,
                name=variant,
                signature=signature(description),
                metadata={"variant": variant, "source_md5": md5, **description},
                registered_model_name=name,
                save_as_external_data=False,  # one self-contained .onnx, as predict expects
                onnx_execution_providers=["CPUExecutionProvider"],  # int8 QDQ is a CPU model
            )
            version = str(info.registered_model_version)
            values = metrics.get(variant, {})
            version_tags = {
                "source_md5": md5,
                "variant": variant,
                **tags,
                **{key: str(values[key]) for key in VERSION_METRICS if key in values},
            }
            for key, value in version_tags.items():
                client.set_model_version_tag(name, version, key, value)
            registered[variant] = Registered(variant, name, version, created=True)
    return registered


def champion_version(variant: str = CHALLENGER) -> str | None:
    """The version number carrying the ``champion`` alias; None before the first promotion."""
    try:
        found = mlflow.MlflowClient().get_model_version_by_alias(model_name(variant), CHAMPION)
        return str(found.version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_champion(version: str, variant: str = CHALLENGER) -> None:
    mlflow.MlflowClient().set_registered_model_alias(model_name(variant), CHAMPION, version)


def score(model_uri: str, test: Split, classes: tuple[str, ...]) -> tuple[float | None, str]:
    """Test macro-F1 of a registered model through ``mlflow.pyfunc``; None and why if it can't.

    The images are normalised with the model's OWN statistics; a model trained
    on other classes or another input size cannot be scored on this split.
    """
    model = mlflow.pyfunc.load_model(model_uri)
    meta = model.metadata.metadata or {}
    if list(meta.get("classes", [])) != list(classes):
        return None, f"its classes {meta.get('classes')} are not this test split's {list(classes)}"
    spec = meta["preprocessing"]
    _, height, width, channels = test.images.shape
    if (int(spec["image_size"]), int(spec["channels"])) != (height, channels) or height != width:
        return None, (
            f"it takes {spec['image_size']}x{spec['image_size']}x{spec['channels']} images, "
            f"this test split holds {height}x{width}x{channels}"
        )
    inputs = normalise(test.images, ChannelStats(mean=tuple(meta["mean"]), std=tuple(meta["std"])))
    logits = model.predict(inputs)[OUTPUT_NAME]
    f1 = f1_macro(test.labels, np.argmax(logits, axis=1), len(classes))
    return f1, "scored on the test split"


@dataclass(frozen=True)
class Candidate:
    """What the promotion rule weighs for one int8 model version."""

    version: str
    f1_macro: float | None  # test macro-F1 on the current split; None: could not be scored
    int8_drop: float | None = None  # its fp32 student's test f1_macro minus its own
    latency_ratio: float | None = None  # int8 b64 latency / fastest fp32 student runtime


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    limit: float
    passed: bool


@dataclass(frozen=True)
class Decision:
    promote: bool
    summary: str
    challenger: Candidate
    champion: Candidate | None
    checks: tuple[Check, ...]

    @property
    def verdict(self) -> str:
        if self.promote:
            return "promoted"
        return "kept the champion" if self.champion is not None else "not promoted (no champion)"

    def metrics(self) -> dict[str, float]:
        """Numbers for the MLflow run: what was compared and what was decided."""
        values = {"promoted": float(self.promote)}
        for check in self.checks:
            if check.value is not None:
                values[check.name] = check.value
        if self.challenger.f1_macro is not None:
            values["challenger_f1_macro"] = self.challenger.f1_macro
        if self.champion is not None and self.champion.f1_macro is not None:
            values["champion_f1_macro"] = self.champion.f1_macro
        return values

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        champion = f"version {self.champion.version}" if self.champion else "none yet"
        lines = [
            f"# retrain: {self.verdict}",
            "",
            self.summary,
            "",
            f"- challenger: `{model_name(CHALLENGER)}` version {self.challenger.version}",
            f"- champion before: {champion}",
            "",
            "| check | value | limit | passed |",
            "|---|---|---|---|",
        ]
        for check in self.checks:
            value = "n/a" if check.value is None else f"{check.value:.4f}"
            lines.append(
                f"| {check.name} | {value} | {check.limit:g} | {'yes' if check.passed else 'NO'} |"
            )
        return "\n".join(lines) + "\n"


def decide(challenger: Candidate, champion: Candidate | None, rules: PromoteParams) -> Decision:
    """Promote when the challenger is within every budget of ``promote:`` in params.yaml.

    - its int8 drop (fp32 student minus int8, test macro-F1) <= ``max_int8_drop``;
    - its int8/fp32 latency ratio at batch 64 <= ``max_latency_ratio``;
    - with a champion: its test macro-F1 >= the champion's minus ``max_f1_drop``,
      both scored by the same code on the same split. A champion that cannot be
      scored on this split (other classes or input size) is replaced.
    A challenger that already is the champion is kept as it is.
    """
    if champion is not None and champion.version == challenger.version:
        return Decision(False, "no new model: the challenger is the champion", challenger,
                        champion, ())  # fmt: skip
    checks = [
        _at_most("int8_f1_drop", challenger.int8_drop, rules.max_int8_drop),
        _at_most("int8_latency_ratio_b64", challenger.latency_ratio, rules.max_latency_ratio),
    ]
    if champion is not None and champion.f1_macro is not None:
        drop = None if challenger.f1_macro is None else champion.f1_macro - challenger.f1_macro
        checks.append(_at_most("f1_drop_vs_champion", drop, rules.max_f1_drop))
    promote = all(check.passed for check in checks)
    failed = [check.name for check in checks if not check.passed]
    if promote:
        summary = "first champion" if champion is None else "within every budget"
    else:
        summary = f"over budget: {', '.join(failed)}"
    return Decision(promote, summary, challenger, champion, tuple(checks))


def _at_most(name: str, value: float | None, limit: float) -> Check:
    return Check(name, value, limit, passed=value is not None and value <= limit + 1e-12)
