"""ONNX export and sessions: the exported fp32 file computes what the PyTorch model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.checkpoints import Checkpoint
from tasks.data.pixels import normalise
from tasks.export.onnx_io import export_onnx, model_metadata, torch_logits
from tasks.inference import onnx_logits, onnx_session
from tests.toymodels import RANDOM_CLASSES, random_checkpoint

# torch's own exporter still calls a deprecated pytree API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, np.ndarray, Path]:
    checkpoint = random_checkpoint()
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(checkpoint.build(), (1, 8, 8), path, model_metadata(checkpoint))
    return checkpoint, normalise(pixels, checkpoint.stats), path


def test_fp32_onnx_matches_torch(exported) -> None:
    checkpoint, images, path = exported
    expected = torch_logits(checkpoint.build(), images, batch_size=16)
    got = onnx_logits(onnx_session(path, threads=1), images, batch_size=16)
    assert got.shape == (64, len(RANDOM_CLASSES))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_batch_is_dynamic(exported) -> None:
    _, images, path = exported
    session = onnx_session(path, threads=1)
    for batch in (1, 5):
        assert onnx_logits(session, images[:batch], batch).shape == (batch, 3)
