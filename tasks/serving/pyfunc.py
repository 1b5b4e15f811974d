"""The registered MLflow model's ``python_function``: encoded images in, top-k labels out.

``registry.register_variants`` logs every model version with
``mlflow.pyfunc.log_model`` as a model from code: ``tasks/serving/mlflow_model.py``
is the model file (it sets an :class:`ImageModel`), the ONNX graph is the
artifact ``onnx``, and this module, ``tasks/inference.py`` and the two data
modules it imports travel in the model's ``code/`` folder as the package
``visionpipe_model``. So anything that loads a pyfunc model runs it:

    mlflow models serve -m "models:/visionpipe-student_int8@champion" --env-manager local
    curl -H 'Content-Type: application/json' http://127.0.0.1:5000/invocations \\
      -d '{"dataframe_split": {"columns": ["image", "name"], "data": [["<base64>", "a.png"]]},
           "params": {"top_k": 3}}'

The input is a table with a binary column ``image`` (the bytes of a PNG, JPEG
or any other file prepare reads; base64 in JSON, which MLflow decodes for a
binary column in ``dataframe_split`` and ``dataframe_records``) and an
optional string column ``name``. The output is one entry per row, in order,
exactly as ``visionpipe predict --json`` prints it: ``{"path", "top_k":
[{"label", "probability"}]}``, or ``{"path", "error", "detail"}`` with
prepare's quarantine reason for a row that is not a usable image. ``path`` is
the row's ``name``, or its position when there is none. The inference
parameter ``top_k`` (default 3) says how many labels each row gets.

Callers who preprocess themselves take the bare graph (``images`` N x C x H x W
float32, normalised -> ``logits``) from the artifact: ``registry.onnx_graph(uri)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from ..inference import MAX_PIXELS, Model, decode_blobs, load_onnx, predict_decoded

IMAGE = "image"  # the input column of encoded image bytes
NAME = "name"  # the optional input column that labels each row's answer
DEFAULT_TOP_K = 3
BATCH = 64  # rows decoded and run at once: a table of any size needs one batch's memory


class ImageClassifier:
    """What ``mlflow.pyfunc.load_model`` returns the predictions of (``predict``)."""

    def __init__(self, model: Model, max_pixels: int = MAX_PIXELS):
        self.model = model
        self.max_pixels = max_pixels

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[dict]:
        """One ``predict --json`` entry per row of ``model_input`` (a DataFrame with ``image``)."""
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        blobs = [_as_bytes(value) for value in model_input[IMAGE]]
        names = _names(model_input, len(blobs))
        answers: list[dict] = []
        for start in range(0, len(blobs), BATCH):
            rows = slice(start, start + BATCH)
            decoded = decode_blobs(blobs[rows], self.model.spec, self.max_pixels)
            predictions = predict_decoded(self.model, names[rows], decoded, top_k)
            answers += [prediction.to_json() for prediction in predictions]
        return answers


def _as_bytes(value: Any) -> bytes:
    """A cell of the ``image`` column; a missing one is empty (reported as ``empty_file``)."""
    if _missing(value):
        return b""
    if isinstance(value, str):
        raise TypeError(
            f"column {IMAGE!r} holds text: give each image file's bytes (base64 only in JSON, "
            "as dataframe_split or dataframe_records, where MLflow decodes it)"
        )
    return bytes(value)


def _names(model_input: Any, rows: int) -> Sequence[str]:
    if NAME not in getattr(model_input, "columns", ()):
        return [str(i) for i in range(rows)]
    given = list(model_input[NAME])
    return [str(i) if _missing(name) else str(name) for i, name in enumerate(given)]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


ONNX_ARTIFACT = "onnx"  # the artifact that holds the model's ONNX graph


class ImageModel(mlflow.pyfunc.PythonModel):
    """The model MLflow loads: :class:`ImageClassifier` on the ``onnx`` artifact.

    ``model_config`` (``mlflow.pyfunc.load_model(uri, model_config=...)``) may
    set ``threads`` (ONNX Runtime intra-op threads, default 1) and
    ``max_pixels`` (a larger image is refused undecoded, as ``too_large``).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config or {}
        path = Path(context.artifacts[ONNX_ARTIFACT])
        threads = int(config.get("threads", 1))
        model = load_onnx(path, source=path.name, artifact=path.name, threads=threads)
        self.classifier = ImageClassifier(model, int(config.get("max_pixels", MAX_PIXELS)))

    # A DataFrame hint: MLflow infers no schema from it, so the logged signature (a
    # binary ``image`` column, an optional ``name``) is the schema.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict]:
        """One ``predict --json`` entry per row of ``model_input`` (a DataFrame with ``image``)."""
        return self.classifier.predict(model_input, params)
