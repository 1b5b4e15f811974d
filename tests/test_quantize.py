"""ONNX export and int8 quantization of a tiny cnn, and checkpoint round-trips."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tasks.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from tasks.datasets import ChannelStats, Split
from tasks.models import build_model
from tasks.params import QuantizeParams
from tasks.quantize import (
    ArrayCalibrationReader,
    calibration_set,
    export_onnx,
    model_metadata,
    onnx_logits,
    onnx_session,
    quantize_onnx,
    torch_logits,
)
from tasks.transforms import normalise

CLASSES = ("a", "b", "c")
# torch's own exporter still calls a deprecated pytree API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

QUANTIZE = QuantizeParams(calibration_size=64, calibration_method="minmax", per_channel=True)


def _checkpoint() -> Checkpoint:
    """A random cnn with realistic (not init-time) BatchNorm statistics and head scale."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, len(CLASSES), width=4, dropout=0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.5)
    return Checkpoint(
        model_name="cnn",
        width=4,
        dropout=0.0,
        in_channels=1,
        image_size=8,
        classes=CLASSES,
        stats=ChannelStats(mean=(0.4,), std=(0.3,)),
        params={"seed": 0, "distill.width": 4},
        metrics={"val_f1_macro": 0.5},
        state_dict=model.state_dict(),
        mlflow_run_id="run-123",
    )


@dataclass(frozen=True)
class Exported:
    checkpoint: Checkpoint
    images: np.ndarray  # normalised NCHW float32: the calibration images
    fp32: Path
    int8: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Exported once per module: the dynamo exporter takes a few seconds."""
    directory = tmp_path_factory.mktemp("onnx")
    checkpoint = _checkpoint()
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    images = normalise(pixels, checkpoint.stats)
    fp32 = export_onnx(
        checkpoint.build(), (1, 8, 8), directory / "student.onnx", model_metadata(checkpoint)
    )
    int8 = quantize_onnx(fp32, directory / "student_int8.onnx", images, QUANTIZE)
    return Exported(checkpoint, images, fp32, int8)


def _metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(path).metadata_props}


def test_int8_file_is_smaller(exported: Exported) -> None:
    assert exported.int8.stat().st_size < exported.fp32.stat().st_size


def test_fp32_onnx_matches_torch(exported: Exported) -> None:
    expected = torch_logits(exported.checkpoint.build(), exported.images, batch_size=16)
    got = onnx_logits(onnx_session(exported.fp32, threads=1), exported.images, batch_size=16)
    assert got.shape == (64, len(CLASSES))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_batch_is_dynamic(exported: Exported) -> None:
    session = onnx_session(exported.fp32, threads=1)
    for batch in (1, 5):
        assert onnx_logits(session, exported.images[:batch], batch).shape == (batch, 3)


def test_int8_agrees_with_float(exported: Exported) -> None:
    fp32 = torch_logits(exported.checkpoint.build(), exported.images, batch_size=64)
    int8 = onnx_logits(onnx_session(exported.int8, threads=1), exported.images, batch_size=64)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9
    scale = np.abs(fp32).max()
    assert scale > 0.1  # the model is not trivially flat, so the bound below means something
    assert np.abs(fp32 - int8).max() <= 0.1 * scale


def test_int8_graph_is_quantized(exported: Exported) -> None:
    ops = {node.op_type for node in onnx.load(exported.int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_models_describe_themselves(exported: Exported) -> None:
    for path in (exported.fp32, exported.int8):
        metadata = _metadata(path)
        assert json.loads(metadata["classes"]) == list(CLASSES)
        assert json.loads(metadata["mean"]) == [0.4]
        assert json.loads(metadata["std"]) == [0.3]
        assert (metadata["image_size"], metadata["channels"]) == ("8", "1")
        assert json.loads(metadata["params"]) == exported.checkpoint.params
    assert json.loads(_metadata(exported.int8)["quantization"]) == QUANTIZE.model_dump()


def test_exporter_debug_info_is_dropped(exported: Exported) -> None:
    for path in (exported.fp32, exported.int8):
        nodes = onnx.load(path).graph.node
        assert nodes
        assert all(not node.metadata_props and not node.doc_string for node in nodes)


def test_calibration_reader_covers_every_image_and_rewinds() -> None:
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    reader = ArrayCalibrationReader(images, batch_size=4)

    def drain() -> list[np.ndarray]:
        batches = []
        while (batch := reader.get_next()) is not None:
            batches.append(batch["images"])
        return batches

    first = drain()
    assert [len(b) for b in first] == [4, 4, 2]
    assert np.array_equal(np.concatenate(first), images)
    reader.rewind()
    assert len(drain()) == 3


def test_calibration_set_draws_without_replacement() -> None:
    checkpoint = _checkpoint()
    pixels = np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2)
    train = Split(pixels, np.zeros(20, np.int64))
    drawn = calibration_set.fn(train, checkpoint, size=50, seed=0)  # more than there are
    assert drawn.shape == (20, 1, 8, 8)
    assert drawn.dtype == np.float32
    np.testing.assert_allclose(
        np.sort(drawn[:, 0, 0, 0]), normalise(pixels, checkpoint.stats)[:, 0, 0, 0]
    )
    assert len(calibration_set.fn(train, checkpoint, size=5, seed=0)) == 5


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    checkpoint = _checkpoint()
    path = save_checkpoint(tmp_path / "student.pt", checkpoint)
    loaded = load_checkpoint(path)
    for field in ("model_name", "width", "in_channels", "image_size", "classes", "stats"):
        assert getattr(loaded, field) == getattr(checkpoint, field)
    assert (loaded.params, loaded.metrics, loaded.mlflow_run_id) == (
        checkpoint.params,
        checkpoint.metrics,
        checkpoint.mlflow_run_id,
    )
    model = loaded.build()
    assert not model.training
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), checkpoint.build()(images))
