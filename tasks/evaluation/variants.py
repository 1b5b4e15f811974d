"""The three variants, each ready to predict in every runtime it can ship in, and their timing.

``load_variants`` builds the teacher and student from their checkpoints (PyTorch
eager) and their fp32 ONNX exports (ONNX Runtime), and the int8 student from its
ONNX file; ``measure_variants_latency`` times every runtime of every variant
back to back in one process (``tasks/evaluation/latency.py``). Used by the
evaluate stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tasks.checkpoints import load_checkpoint
from tasks.data.pixels import ChannelStats, normalise
from tasks.evaluation.latency import (
    BATCH,
    Latency,
    measure_runtimes,
    tile_batch,
)
from tasks.evaluation.results import (
    ORT_FP32,
    ORT_INT8,
    TORCH_EAGER,
)
from tasks.export.onnx_io import torch_logits
from tasks.inference import onnx_logits, onnx_session
from tasks.models import count_params
from tasks.orchestration import stage_task
from tasks.params import EvaluateParams

Predict = Callable[[np.ndarray], np.ndarray]  # normalised NCHW float32 -> logits


@dataclass(frozen=True)
class Variant:
    """A model as it ships: how to run it, where its artifact is, what made it.

    ``predict`` gives the scores; ``runtimes`` runs the same network in each
    runtime it can ship in, for the latency comparison.
    """

    name: str
    predict: Predict
    artifact: Path
    runtimes: Mapping[str, Predict]
    params: int
    classes: tuple[str, ...]
    stats: ChannelStats
    run_params: dict[str, Any]
    source_run_id: str | None
    class_prior: tuple[float, ...] | None = None  # what logit adjustment divides out
    module: torch.nn.Module | None = None  # the PyTorch network, for Grad-CAM (fp32 only)


def _torch_predict(model: torch.nn.Module) -> Predict:
    return lambda x: torch_logits(model, x, batch_size=len(x))


def _onnx_predict(session: ort.InferenceSession) -> Predict:
    return lambda x: onnx_logits(session, x, batch_size=len(x))


@stage_task(name="load-variants")
def load_variants(
    teacher: tuple[Path, Path], student: tuple[Path, Path], student_int8: Path, threads: int
) -> list[Variant]:
    """The three variants, each ready to predict on normalised images in each of its runtimes.

    ``teacher`` and ``student`` are each a checkpoint and its fp32 ONNX export (the
    train stage's ``models/teacher.onnx``; the quantize stage's ``models/student.onnx``,
    what the int8 model was made from).
    """
    torch.set_num_threads(threads)
    variants = []
    for name, (path, onnx_path) in (("teacher", teacher), ("student", student)):
        checkpoint = load_checkpoint(path)
        model = checkpoint.build()
        session = onnx_session(onnx_path, threads)
        eager = _torch_predict(model)
        variants.append(
            Variant(
                name=name,
                predict=eager,
                artifact=path,
                runtimes={TORCH_EAGER: eager, ORT_FP32: _onnx_predict(session)},
                params=count_params(model),
                classes=checkpoint.classes,
                stats=checkpoint.stats,
                run_params=checkpoint.params,
                source_run_id=checkpoint.mlflow_run_id,
                class_prior=checkpoint.class_prior,
                module=model,
            )
        )
    int8 = _onnx_predict(onnx_session(student_int8, threads))
    student_variant = variants[1]
    metadata = {p.key: p.value for p in onnx.load(student_int8).metadata_props}
    quantization = json.loads(metadata.get("quantization", "{}"))
    variants.append(
        Variant(
            name="student_int8",
            predict=int8,
            artifact=student_int8,
            runtimes={ORT_INT8: int8},
            # Quantization changes how weights are stored, not how many there are.
            params=student_variant.params,
            classes=student_variant.classes,
            stats=student_variant.stats,
            run_params={
                **student_variant.run_params,
                **{f"quantize.{key}": value for key, value in quantization.items()},
            },
            source_run_id=student_variant.source_run_id,
            class_prior=student_variant.class_prior,
        )
    )
    return variants


@stage_task(name="measure-latency")
def measure_variants_latency(
    variants: list[Variant], images: np.ndarray, params: EvaluateParams
) -> dict[str, dict[str, Latency]]:
    """Every runtime of every variant, timed back to back on the same test images.

    One call for all of them, so the int8 model and the fp32 runtimes it is
    compared with see the same machine at the same time.
    """
    torch.set_num_threads(params.num_threads)  # ONNX Runtime sessions have theirs
    batch = tile_batch(np.asarray(images), BATCH)
    runtimes = {
        (variant.name, runtime): (predict, normalise(batch, variant.stats))
        for variant in variants
        for runtime, predict in variant.runtimes.items()
    }
    measured = measure_runtimes(runtimes, params.latency_warmup, params.latency_repeats)
    by_variant: dict[str, dict[str, Latency]] = {variant.name: {} for variant in variants}
    for (name, runtime), latency in measured.items():
        by_variant[name][runtime] = latency
    return by_variant
