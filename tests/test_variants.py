"""The three variants in every runtime they ship in, timed back to back (tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data.pixels import normalise
from tasks.evaluation import variants
from tasks.evaluation.results import ORT_FP32, TORCH_EAGER
from tasks.evaluation.variants import Variant, measure_variants_latency
from tasks.export.onnx_io import export_onnx
from tasks.inference import onnx_session
from tasks.models import build_model
from tests.evaluations import LATENCY_KEYS


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_measure_variants_latency_times_torch_and_onnxruntime(
    tiny_prepared, params, tmp_path: Path
) -> None:
    """A tiny cnn in PyTorch eager and in ONNX Runtime; the 20 test images are fewer than 64,
    so the batch repeats them."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, width=4, dropout=0.0).eval()
    session = onnx_session(export_onnx(model, (1, 8, 8), tmp_path / "cnn.onnx", {}), threads=1)
    fp32 = Variant(
        name="student",
        predict=variants._torch_predict(model),
        artifact=Path("unused"),
        runtimes={
            TORCH_EAGER: variants._torch_predict(model),
            ORT_FP32: variants._onnx_predict(session),
        },
        params=0,
        classes=tiny_prepared.classes,
        stats=tiny_prepared.stats,
        run_params={},
        source_run_id=None,
    )
    images = normalise(tiny_prepared.test.images, fp32.stats)
    np.testing.assert_allclose(  # the same network in both runtimes
        fp32.runtimes[ORT_FP32](images), fp32.runtimes[TORCH_EAGER](images), rtol=1e-4, atol=1e-4
    )
    quick = params.evaluate.model_copy(update={"latency_warmup": 1, "latency_repeats": 3})
    latency = measure_variants_latency.fn([fp32], tiny_prepared.test.images, quick)
    assert set(latency) == {"student"}
    assert set(latency["student"]) == {TORCH_EAGER, ORT_FP32}
    for measured in latency["student"].values():
        numbers = measured.as_dict()
        assert set(numbers) == LATENCY_KEYS
        assert all(np.isfinite(v) and v > 0 for v in numbers.values())
