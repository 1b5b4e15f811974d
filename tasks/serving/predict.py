"""Predict: top-k labels for new image files, decoded exactly as the model's training data was.

Run with ``visionpipe predict PATH... [--model REF] [--top-k K] [--json]``.
``REF`` is a variant (``teacher``, ``student``, ``student_int8``: the files
``dvc repro`` wrote under ``models/``), a ``.pt`` or ``.onnx`` file, or an
MLflow artifact URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``).

The preprocessing comes from the artifact itself (checkpoint field or ONNX
metadata ``preprocessing``, written from ``ImageSpec.preprocessing``), never
from params.yaml: params.yaml describes the *next* run, and a model found in
MLflow months later must still see images the way it saw them in training.
Each file goes through ``decode_item``, the function prepare used, so EXIF
orientation, alpha compositing and the resize mode match too; a file it
cannot use is reported with prepare's quarantine reason, and the rest go on.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tasks.data.images import FileItems, ImageSpec, Outcome, decode_item
from tasks.data.sources import IMAGE_SUFFIXES
from tasks.export.onnx_io import torch_logits
from tasks.inference import Model, ModelError, Prediction, image_spec, load_onnx, predict_decoded
from tasks.layout import STUDENT, STUDENT_INT8, TEACHER

VARIANTS: dict[str, Path] = {"teacher": TEACHER, "student": STUDENT, "student_int8": STUDENT_INT8}
MODEL_SUFFIXES = (".onnx", ".pt")


def _load_torch(path: Path, source: str, artifact: str, threads: int) -> Model:
    import torch

    from tasks.checkpoints import load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except Exception as exc:  # unpickling, missing keys, a file that is not torch's at all
        raise ModelError(f"{path}: not a visionpipe checkpoint ({exc})") from exc
    spec = image_spec(checkpoint.preprocessing, path)
    torch.set_num_threads(threads)
    module = checkpoint.build()
    return Model(
        source=source,
        artifact=artifact,
        classes=checkpoint.classes,
        stats=checkpoint.stats,
        spec=spec,
        runtime="torch",
        logits=lambda images: torch_logits(module, images, batch_size=len(images)),
    )


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes, read in blocks: what ``dvc.lock`` records for it.

    The registry tags each model version with it (``source_md5``); ``serve-model``
    names a served file's version by it.
    """
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pick_artifact(directory: Path) -> Path:
    """The one model file in a folder (an MLflow ``model`` artifact): ONNX over a checkpoint.

    Several ONNX files are fine when exactly one is the int8 export (quantize
    writes ``student.onnx`` beside ``student_int8.onnx``); any other choice is
    the user's, so the error lists the candidates.
    """
    found = sorted(p for p in directory.rglob("*") if p.suffix in MODEL_SUFFIXES and p.is_file())
    candidates = [p for p in found if p.suffix == ".onnx"] or found
    if len(candidates) > 1:
        int8 = [p for p in candidates if p.name.endswith("_int8.onnx")]
        candidates = int8 if len(int8) == 1 else candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelError(f"{directory} holds no .onnx or .pt file")
    names = ", ".join(str(p.relative_to(directory)) for p in candidates)
    raise ModelError(f"{directory} holds several models ({names}): name one of them")


def _load_file(path: Path, source: str, threads: int, root: Path | None = None) -> Model:
    """Load ``path`` (a folder: its one model file); ``root``: name it relative to this."""
    if path.is_dir():
        path = pick_artifact(path)
    artifact = str(path.resolve().relative_to(root.resolve()) if root else path)
    if path.suffix == ".onnx":
        return load_onnx(path, source, artifact, threads)
    if path.suffix == ".pt":
        return _load_torch(path, source, artifact, threads)
    raise ModelError(f"{path}: a model is a .onnx or .pt file")


def _load_uri(uri: str, threads: int) -> Model:
    import mlflow.artifacts

    from tasks.tracking_store import tracking_uri

    # runs:/ and models:/ resolve through the tracking server the pipeline logs to.
    mlflow.set_tracking_uri(tracking_uri())
    # The weights are in memory once loaded, so the download need not outlive this call.
    with tempfile.TemporaryDirectory(prefix="visionpipe-predict-") as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        except Exception as exc:  # MlflowException, OSError, a bad URI scheme...
            raise ModelError(f"cannot download {uri} ({exc})") from exc
        return _load_file(Path(local), uri, threads, root=Path(scratch))


def load_model(ref: str, threads: int = 1) -> Model:
    """The model ``ref`` names: a variant, a ``.pt``/``.onnx`` file (or folder), an MLflow URI."""
    if ref in VARIANTS:
        path = VARIANTS[ref]
        if not path.is_file():
            raise ModelError(f"{path} does not exist: run `dvc repro` (or `dvc pull`) first")
        return _load_file(path, ref, threads)
    if Path(ref).exists():
        return _load_file(Path(ref), ref, threads)
    if ":/" in ref:
        return _load_uri(ref, threads)
    raise ModelError(
        f"unknown model {ref!r}: give a variant ({', '.join(VARIANTS)}), a .onnx or .pt "
        "file, or an MLflow URI (runs:/<run_id>/model, models:/<name>/<version>)"
    )


def _walk(directory: Path) -> list[Path]:
    """Image files under ``directory``, sorted, skipping hidden entries (as prepare does)."""
    found: list[Path] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                found.extend(_walk(Path(entry.path)))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(entry.path))
    return sorted(found)


def collect_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files to predict on, in the order given; folders are walked for image files.

    A file named explicitly is kept whatever its suffix, so a broken one is
    reported rather than skipped. A path that does not exist, or a folder
    without images, is kept as itself: ``predict_paths`` reports it.
    """
    collected: list[Path] = []
    for path in map(Path, paths):
        found = _walk(path) if path.is_dir() else []
        collected.extend(found or [path])
    return collected


def _decode(items: FileItems, i: int, spec: ImageSpec) -> tuple[Outcome, np.ndarray | None]:
    """``decode_item``, after the two failures that only a path given by hand can have."""
    path = Path(items.paths[i])
    if not path.exists():
        return Outcome("not_found", "no such file or folder"), None
    if path.is_dir():
        return Outcome("no_images", f"no {', '.join(sorted(IMAGE_SUFFIXES))} file in it"), None
    return decode_item(items, i, spec)


def predict_paths(
    model: Model, paths: Sequence[Path], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """One ``Prediction`` per path, in order; ``top_k`` is capped at the number of classes.

    Files are decoded and run ``batch_size`` at a time, so a folder of any size
    needs the memory of one batch.
    """
    predictions: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        items = FileItems(np.asarray([str(p) for p in paths[start : start + batch_size]], object))
        decoded = [_decode(items, i, model.spec) for i in range(len(items))]
        predictions += predict_decoded(model, list(items.paths), decoded, top_k)
    return predictions
