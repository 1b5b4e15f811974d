"""ONNX out: export a model to one self-describing file.

``export_onnx`` writes a model with a dynamic batch and the metadata a file
needs to describe itself (classes, preprocessing, params: ``model_metadata``),
stripped of the exporter's debug information (``finalise_onnx``);
``export_checkpoint`` does so for a checkpoint's network;
``torch_logits`` runs images through a PyTorch model the way
``tasks/inference.py``'s ``onnx_logits`` runs them through a file. Used by the
train (the teacher), quantize and evaluate stages, ``visionpipe predict`` and the MLflow registry;
nothing here trains or quantizes.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from tasks.artifacts import atomic_path

if TYPE_CHECKING:  # torch only where a model is exported or run: a served ONNX file needs none
    from torch import nn

    from tasks.checkpoints import Checkpoint

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def model_metadata(checkpoint: Checkpoint, **extra: object) -> dict[str, str]:
    """What an ONNX file needs to describe itself: classes, preprocessing, params."""
    return {
        "classes": json.dumps(list(checkpoint.classes)),
        "mean": json.dumps(list(checkpoint.stats.mean)),
        "std": json.dumps(list(checkpoint.stats.std)),
        "image_size": str(checkpoint.image_size),
        "channels": str(checkpoint.in_channels),
        "params": json.dumps(checkpoint.params),
        "preprocessing": json.dumps(checkpoint.preprocessing),
        **{key: json.dumps(value) for key, value in extra.items()},
    }


def _compact(graph: onnx.GraphProto) -> None:
    """Short names for every internal tensor and node; no all-zero zero points on constants.

    The quantizer names tensors like ``features.2.0.weight_bias_quantized_scale``
    and adds an explicit zero point of zeros to every int32 bias and every
    (symmetric) int8 weight. Neither changes a result (a missing zero point
    *is* zero in the ONNX spec), but in a 24k-parameter model they are a tenth
    of the int8 file.
    """
    initializers = {init.name: init for init in graph.initializer}
    zeros = {
        init.name
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.INT32
        and not numpy_helper.to_array(init).any()
        and init.name.endswith("zero_point")
    }
    conv_inputs = {name for node in graph.node if node.op_type == "Conv" for name in node.input}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        # An int32 bias, or a conv's int8 weights stored as a constant (symmetric, so
        # zero): the missing zero point takes the constant's own type. ORT still
        # fuses such a conv into QLinearConv, but not a Gemm into QGemm (checked
        # in tests/test_quantize.py), so Gemm weights keep theirs.
        stored = initializers.get(node.input[0])
        point = initializers.get(node.input[2])
        implicit = node.input[2] in zeros or (
            node.output[0] in conv_inputs
            and stored is not None
            and point is not None
            and stored.data_type == point.data_type == onnx.TensorProto.INT8
            and not numpy_helper.to_array(point).any()
        )
        if implicit:
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    keep = {value.name for value in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names):x}")

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
        node.name = f"n{i:x}"
    for value in graph.value_info:
        value.name = short(value.name)


def finalise_onnx(path: Path, metadata: dict[str, str]) -> None:
    """Set the model's own metadata, drop the exporter's debug info, compact names.

    The dynamo exporter records a stack trace and FX names on every node
    (over 1 KB each) and torch.export's graph signature on the graph; shape
    inference leaves a shape for every intermediate tensor, and the quantizer
    declares opsets of domains it did not use. Useful when debugging an
    export, pure weight in a deployable file, and enough to swamp the int8
    savings of a small model.
    """
    model = onnx.load(path)
    graph = model.graph
    for item in [*graph.node, *graph.input, *graph.output, graph]:
        del item.metadata_props[:]
        item.doc_string = ""
    # Intermediate shapes: ORT infers them when it loads the model.
    del graph.value_info[:]
    _compact(graph)
    used = {node.domain or "" for node in graph.node} | {""}
    for opset in [opset for opset in model.opset_import if opset.domain not in used]:
        model.opset_import.remove(opset)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def export_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], path: Path, metadata: dict[str, str]
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch."""
    import torch

    sample = torch.zeros(2, *input_shape)
    # The exporter warns about torchvision ops it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # torch's own exporter trips a deprecation inside torch (LeafSpec); not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model.eval(),
            (sample,),
            tmp,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            optimize=True,
            verbose=False,
        )
        finalise_onnx(tmp, metadata)
    return path


def export_checkpoint(checkpoint: Checkpoint, path: Path, **extra: object) -> Path:
    """The network ``checkpoint`` describes, exported with its metadata (``model_metadata``)."""
    return export_onnx(
        checkpoint.build(), input_shape(checkpoint), path, model_metadata(checkpoint, **extra)
    )


def torch_logits(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                model(torch.from_numpy(images[i : i + batch_size])).numpy()
                for i in range(0, len(images), batch_size)
            ]
        )


def input_shape(checkpoint: Checkpoint) -> tuple[int, int, int]:
    return (checkpoint.in_channels, checkpoint.image_size, checkpoint.image_size)
