"""The MLflow model registry: the three variants as image-taking models, and the champion rule.

Every variant is registered as ``visionpipe-<variant>``: the int8 and fp32
students are the files ``quantize`` wrote, the teacher is exported from its
checkpoint the way ``evaluate`` times it. Each model version is logged the way
MLflow documents custom models, ``mlflow.pyfunc.log_model`` with a model from
code (``tasks/serving/mlflow_model.py``) and its artifact:

- its ``python_function`` takes images: a table with a binary column ``image``
  (PNG, JPEG, ... bytes) and an optional ``name``, and returns ``visionpipe
  predict --json``'s entries (top-k labels with probabilities, or prepare's
  quarantine reason). Its code (``tasks/serving/pyfunc.py``,
  ``tasks/inference.py`` and the decoding they import) is copied into the
  model, so ``mlflow models serve -m models:/visionpipe-student_int8@champion``
  serves images with ONNX Runtime, Pillow and numpy, without this repository
  or torch; it decodes with the preprocessing stored in the model.
- its artifact ``onnx`` is the bare graph, for callers who preprocess
  themselves (:func:`onnx_graph`): ``images`` float32 N x C x H x W,
  normalised with the model's ``mean``/``std`` -> ``logits`` N x classes. That
  tensor signature is in the metadata as ``tensor_signature``.

The metadata also holds the classes, the normalisation statistics and the
preprocessing (``ImageSpec``): the facts ``visionpipe predict`` reads from the
ONNX file itself.

A version is only created for a file whose content is new: each version is
tagged with the md5 of the file DVC tracks (``source_md5``), so re-running the
retrain flow with nothing changed registers nothing.

The promotion rule is :func:`decide`, a pure function of the numbers, so the
flow, its tests and the logged decision agree on what "better" means.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array, Object, Property
from PIL import Image

from tasks.checkpoints import load_checkpoint
from tasks.data.datasets import Split
from tasks.data.images import ImageSpec
from tasks.data.pixels import ChannelStats, normalise
from tasks.export.onnx_io import INPUT_NAME, OUTPUT_NAME, export_checkpoint
from tasks.inference import onnx_logits, onnx_session
from tasks.layout import STUDENT_FP32_ONNX, STUDENT_INT8, TEACHER_ONNX
from tasks.metrics import f1_macro
from tasks.params import PromoteParams
from tasks.serving.predict import file_md5
from tasks.serving.pyfunc import DEFAULT_TOP_K, IMAGE, NAME, ONNX_ARTIFACT

MODEL_PREFIX = "visionpipe-"
CHAMPION = "champion"
CHALLENGER = "student_int8"
# The file DVC tracks for each variant: what source_md5 hashes.
VARIANT_FILES: dict[str, Path] = {
    "teacher": TEACHER_ONNX,
    "student": STUDENT_FP32_ONNX,
    "student_int8": STUDENT_INT8,
}
# Copied from metrics/evaluate.json onto each version, so the registry UI shows them.
VERSION_METRICS = ("f1_macro", "accuracy", "size_bytes", "latency_ms_b1", "latency_ms_b64")

# The code a model version carries, under tasks/: the pyfunc and everything it imports
# (tests/test_registry.py loads a model where `tasks` cannot be imported, to prove it).
TASKS_DIR = Path(__file__).resolve().parents[1]
SHIPPED = ("inference.py", "data/images.py", "data/pixels.py", "serving/pyfunc.py")
PACKAGE = "visionpipe_model"  # their package inside the model: never shadows `tasks`
MODEL_CODE = TASKS_DIR / "serving" / "mlflow_model.py"  # the model file: imports PACKAGE
# The version tag that says its python_function takes image files.
INPUT_TAG, IMAGE_INPUT = "pyfunc_input", "image"
# What the pyfunc imports at serving time (mlflow itself is added by MLflow).
SERVING_REQUIREMENTS = ("numpy", "pillow", "onnxruntime", "pandas")


def model_name(variant: str) -> str:
    return f"{MODEL_PREFIX}{variant}"


def champion_uri(variant: str = CHALLENGER) -> str:
    return f"models:/{model_name(variant)}@{CHAMPION}"


def onnx_file(variant: str, path: Path, scratch: Path) -> Path:
    """The ONNX file registered for ``variant``: ``path`` itself, or exported from a checkpoint."""
    if path.suffix == ".onnx":
        return path
    return export_checkpoint(load_checkpoint(path), scratch / f"{variant}.onnx", variant=variant)


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


def image_signature() -> ModelSignature:
    """``image`` bytes (and an optional ``name``) -> one ``predict --json`` entry per row."""
    label = Object([Property("label", DataType.string), Property("probability", DataType.double)])
    return ModelSignature(
        inputs=Schema(
            [ColSpec(DataType.binary, IMAGE), ColSpec(DataType.string, NAME, required=False)]
        ),
        outputs=Schema(
            [
                ColSpec(DataType.string, "path"),
                ColSpec(Array(label), "top_k", required=False),
                ColSpec(DataType.string, "error", required=False),
                ColSpec(DataType.string, "detail", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )


def tensor_signature(description: Mapping[str, Any]) -> ModelSignature:
    """The ``onnx`` flavour's: ``images`` (N, C, H, W) float32, normalised -> ``logits``."""
    spec = description["preprocessing"]
    size, channels = int(spec["image_size"]), int(spec["channels"])
    images = TensorSpec(np.dtype(np.float32), (-1, channels, size, size), INPUT_NAME)
    logits = TensorSpec(np.dtype(np.float32), (-1, len(description["classes"])), OUTPUT_NAME)
    return ModelSignature(inputs=Schema([images]), outputs=Schema([logits]))


def input_example(description: Mapping[str, Any]) -> pd.DataFrame:
    """One blank image of the model's size, as a PNG: the request the MLflow UI shows."""
    spec = ImageSpec.from_preprocessing(description["preprocessing"])
    fill = spec.background if spec.channels == 1 else (spec.background,) * 3
    png = io.BytesIO()
    Image.new(spec.mode, (spec.size, spec.size), fill).save(png, format="PNG")
    return pd.DataFrame({IMAGE: [png.getvalue()], NAME: ["example.png"]})


def ship_code(scratch: Path) -> Path:
    """``SHIPPED`` copied into ``scratch/visionpipe_model``, each folder made a package."""
    root = scratch / PACKAGE
    for relative in SHIPPED:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TASKS_DIR / relative, target)
    for package in {root, *((root / relative).parent for relative in SHIPPED)}:
        (package / "__init__.py").write_text(
            '"""visionpipe\'s image decoding and inference, shipped inside an MLflow model."""\n'
        )
    return root


@contextmanager
def shipped_code() -> Iterator[Path]:
    """The model's code package in a temporary folder, importable while it exists.

    MLflow runs a model-from-code file when it logs it (to check the input
    example), so ``visionpipe_model`` must import then as it will at serving time.
    """
    with tempfile.TemporaryDirectory(prefix="visionpipe-code-") as scratch:
        package = ship_code(Path(scratch))
        sys.path.insert(0, scratch)
        try:
            yield package
        finally:
            sys.path.remove(scratch)
            for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
                del sys.modules[name]  # the next model imports its own copy


def _image_model(onnx_path: Path, code: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``mlflow.pyfunc.log_model``'s (and ``save_model``'s) arguments for ``onnx_path``."""
    description = describe(onnx.load(str(onnx_path)))
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {ONNX_ARTIFACT: str(onnx_path)},
        "code_paths": [str(code)],
        "metadata": {
            **metadata,
            **description,
            "tensor_signature": tensor_signature(description).to_dict(),
        },
        "signature": image_signature(),
        "input_example": input_example(description),
        "pip_requirements": [f"{n}=={installed_version(n)}" for n in SERVING_REQUIREMENTS],
    }


def log_image_model(
    variant: str, onnx_path: Path, code: Path, metadata: Mapping[str, Any], registered_name: str
) -> mlflow.models.model.ModelInfo:
    """Log ``onnx_path`` as an image-taking model of the active run and register it."""
    return mlflow.pyfunc.log_model(
        name=variant,
        registered_model_name=registered_name,
        **_image_model(onnx_path, code, metadata),
    )


def save_image_model(path: Path, onnx_path: Path) -> Path:
    """The model ``log_image_model`` logs, as a local folder (``mlflow models serve -m PATH``)."""
    with shipped_code() as code:
        mlflow.pyfunc.save_model(
            str(path), **_image_model(onnx_path, code, {"source_md5": file_md5(onnx_path)})
        )
    return path


def onnx_graph(model_uri: str) -> onnx.ModelProto:
    """A registered version's bare ONNX graph (normalised tensors in, logits out).

    Its ``onnx`` artifact; a version an older visionpipe registered has an
    ``onnx`` flavour instead, read the same way by ``mlflow.onnx``.
    """
    info = mlflow.models.get_model_info(model_uri)
    if "onnx" in info.flavors:
        return mlflow.onnx.load_model(model_uri)
    artifact = info.flavors["python_function"]["artifacts"][ONNX_ARTIFACT]["path"]
    with tempfile.TemporaryDirectory(prefix="visionpipe-onnx-") as scratch:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=scratch)
        return onnx.load(str(Path(local) / artifact))


def find_version(client: mlflow.MlflowClient, name: str, md5: str) -> ModelVersion | None:
    """The image-taking version of ``name`` registered from a file with this md5, if any.

    A version registered before the models took images (no ``pyfunc_input``
    tag) does not count: the same file is registered again, once, as one that does.
    """
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matches = [
        v for v in versions
        if v.tags.get("source_md5") == md5 and v.tags.get(INPUT_TAG) == IMAGE_INPUT
    ]  # fmt: skip
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
    """Register each variant's file as a model version, unless its content already is.

    Must run inside an active MLflow run (the models are logged to it). ``tags``
    (git commit, data hash) and the variant's test metrics go on each new version.
    """
    client = mlflow.MlflowClient()
    registered: dict[str, Registered] = {}
    with shipped_code() as code, tempfile.TemporaryDirectory(prefix="visionpipe-") as scratch:
        for variant, path in files.items():
            name, md5 = model_name(variant), file_md5(path)
            if (existing := find_version(client, name, md5)) is not None:
                version = str(existing.version)
                registered[variant] = Registered(variant, name, version, created=False)
                continue
            exported = onnx_file(variant, path, Path(scratch))
            info = log_image_model(
                variant, exported, code, {"variant": variant, "source_md5": md5}, name
            )
            version = str(info.registered_model_version)
            values = metrics.get(variant, {})
            version_tags = {
                "source_md5": md5,
                "variant": variant,
                INPUT_TAG: IMAGE_INPUT,
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
    """Test macro-F1 of a registered model, run on its ONNX graph; None and why if it can't.

    Through the bare graph (:func:`onnx_graph`), which every version has
    (those registered before the image pyfunc too), so champion and challenger
    are scored by the same code. The images are normalised with the model's OWN statistics; a
    model trained on other classes or another input size cannot be scored on
    this split. (The pyfunc decodes a PNG of a split image to the same array,
    so it would give the same labels: ``tests/test_registry.py`` checks.)
    """
    meta = mlflow.models.get_model_info(model_uri).metadata or {}
    if list(meta.get("classes", [])) != list(classes):
        return None, f"its classes {meta.get('classes')} are not this test split's {list(classes)}"
    spec = meta["preprocessing"]
    _, height, width, channels = test.images.shape
    if (int(spec["image_size"]), int(spec["channels"])) != (height, channels) or height != width:
        return None, (
            f"it takes {spec['image_size']}x{spec['image_size']}x{spec['channels']} images, "
            f"this test split holds {height}x{width}x{channels}"
        )
    session = onnx_session(onnx_graph(model_uri).SerializeToString(), threads=1)
    stats = ChannelStats(mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    logits = onnx_logits(session, normalise(test.images, stats), batch_size=256)
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
