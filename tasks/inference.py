"""Inference: encoded image files in, top-k labels out, with numpy, Pillow and ONNX Runtime only.

Every way visionpipe answers for a new image goes through here: ``visionpipe
predict`` (files), ``visionpipe serve-model`` (uploads) and the MLflow model
each variant is registered as (``tasks/serving/pyfunc.py``). Each image is
decoded by prepare's own ``decode_item`` with the preprocessing the model
carries, normalised with the model's own statistics, and run through one ONNX
Runtime session; ``probabilities`` is also what ``evaluate`` scores with, so a
served probability is the one the evaluation reported.

This module and the two it imports (``data/images.py``, ``data/pixels.py``)
are copied into every registered MLflow model, so a served model needs neither
this repository nor torch. That is why they import each other *relatively*:
inside a model they live in a package of their own, not in ``tasks``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from .data.images import ImageSpec, Outcome, decode_item
from .data.pixels import ChannelStats, normalise

MAX_PIXELS = 40_000_000  # a larger image is refused before it is decoded (decompression bomb)


def onnx_session(path: Path | bytes, threads: int) -> ort.InferenceSession:
    """A CPU session with a fixed thread count (so latencies compare across variants)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The session's output for ``images`` (normalised N x C x H x W), ``batch_size`` at a time."""
    (images_in,), (logits_out,) = session.get_inputs(), session.get_outputs()
    return np.concatenate(
        [
            session.run([logits_out.name], {images_in.name: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over classes in float64 (rows of ``logits``), after dividing by ``temperature``."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class ModelError(Exception):
    """The model cannot be found or used; the message says what to do about it."""


@dataclass(frozen=True)
class Model:
    """A trained classifier with everything needed to turn an image file into class scores."""

    source: str  # what was asked for: a variant, a path or an MLflow URI
    artifact: str  # the file that was loaded (its name inside the URI's download)
    classes: tuple[str, ...]
    stats: ChannelStats
    spec: ImageSpec
    runtime: str  # onnxruntime | torch
    logits: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)

    def describe(self) -> str:
        """What answered: ``student_int8: models/student_int8.onnx (onnxruntime; 16x16x1, ...)``."""
        where = self.source if self.artifact == self.source else f"{self.source}: {self.artifact}"
        spec = self.spec
        return (
            f"{where} ({self.runtime}; {spec.size}x{spec.size}x{spec.channels}, "
            f"resize={spec.resize}, background={spec.background})"
        )


def image_spec(preprocessing: dict[str, Any] | None, artifact: Path) -> ImageSpec:
    """The ``ImageSpec`` a model's stored ``preprocessing`` describes, or why there is none."""
    if preprocessing is None:
        raise ModelError(
            f"{artifact} predates preprocessing metadata: it does not record how images "
            "were decoded for training, so predict cannot repeat it. Re-run `dvc repro` "
            "to rebuild the models with it."
        )
    try:
        return ImageSpec.from_preprocessing(preprocessing)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{artifact}: unreadable preprocessing {preprocessing!r} ({exc!r})"
        ) from exc


def load_onnx(path: Path, source: str, artifact: str, threads: int) -> Model:
    """A visionpipe ONNX export (classes, statistics and preprocessing in its metadata)."""
    try:
        session = onnx_session(path, threads)
    except Exception as exc:  # ORT raises its own types for each way a file can be bad
        raise ModelError(f"{path}: not a usable ONNX model ({exc})") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("classes", "mean", "std") if key not in metadata]
    if missing:
        raise ModelError(
            f"{path}: no {', '.join(missing)} in its metadata: not a visionpipe export"
        )
    return Model(
        source=source,
        artifact=artifact,
        classes=tuple(json.loads(metadata["classes"])),
        stats=ChannelStats(
            mean=tuple(json.loads(metadata["mean"])), std=tuple(json.loads(metadata["std"]))
        ),
        spec=image_spec(json.loads(metadata.get("preprocessing", "null")), path),
        runtime="onnxruntime",
        logits=lambda images: onnx_logits(session, images, batch_size=len(images)),
    )


@dataclass(frozen=True)
class Prediction:
    """One file's top-k (label, probability), best first, or why it could not be read."""

    path: str
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None  # not_found | no_images | prepare's quarantine reasons
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"path": self.path, "error": self.error, "detail": self.detail}
        top = [{"label": label, "probability": p} for label, p in self.top_k]
        return {"path": self.path, "top_k": top}

    def to_text(self) -> str:
        if not self.ok:
            return f"{self.path}: ERROR {self.error} ({self.detail})"
        return f"{self.path}: " + ", ".join(f"{label} {p:.3f}" for label, p in self.top_k)


@dataclass(frozen=True)
class BlobItems:
    """Encoded images in memory as prepare's ``Items``, so ``decode_item`` reads them like files."""

    blobs: Sequence[bytes]
    max_pixels: int = MAX_PIXELS

    def __len__(self) -> int:
        return len(self.blobs)

    def read(self, i: int) -> bytes:
        return self.blobs[i]

    def open(self, raw: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if width * height > self.max_pixels:
            image.close()
            raise _Bomb(f"{width}x{height} pixels is above the limit of {self.max_pixels:,}")
        return image


class _Bomb(Image.DecompressionBombError):
    """Raised before decoding: ``decode_item`` reports it as ``too_large``."""


def decode_blobs(
    blobs: Sequence[bytes], spec: ImageSpec, max_pixels: int = MAX_PIXELS
) -> list[tuple[Outcome, np.ndarray | None]]:
    """``decode_item`` on each encoded image (PNG, JPEG, ... as bytes), in order."""
    items = BlobItems(blobs, max_pixels)
    return [decode_item(items, i, spec) for i in range(len(items))]


def _top_k(probs: np.ndarray, classes: tuple[str, ...], k: int) -> tuple[tuple[str, float], ...]:
    best = np.argsort(-probs, kind="stable")[:k]  # ties: the lower class index first
    return tuple((classes[i], float(probs[i])) for i in best)


def predict_decoded(
    model: Model,
    names: Sequence[str],
    decoded: Sequence[tuple[Outcome, np.ndarray | None]],
    top_k: int = 3,
) -> list[Prediction]:
    """Predictions for images ``decode_item`` already decoded (one forward pass for them all).

    ``names`` label the results (paths, or an upload's file names); a decoding
    failure becomes that image's error, with prepare's quarantine reason.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (got {top_k})")
    k = min(top_k, len(model.classes))
    arrays = [array for outcome, array in decoded if outcome.ok]
    # One forward pass; rows follow the good images in order.
    rows = iter(
        probabilities(model.logits(normalise(np.stack(arrays), model.stats))) if arrays else []
    )
    predictions = []
    for name, (outcome, _) in zip(names, decoded, strict=True):
        if outcome.ok:
            predictions.append(Prediction(name, top_k=_top_k(next(rows), model.classes, k)))
        else:
            predictions.append(Prediction(name, error=outcome.reason, detail=outcome.detail))
    return predictions
