"""The model registry and the promotion rule, against a real MLflow store (sqlite in tmp).

The three files are a tiny trained model exported exactly as the pipeline
exports its own (``tests/toymodels.py``), so what is registered, loaded back
through ``mlflow.pyfunc`` and scored is the real thing, only smaller.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks.data.datasets import Split
from tasks.data.pixels import normalise
from tasks.inference import onnx_logits, onnx_session
from tasks.metrics import f1_macro
from tasks.params import Params, PromoteParams
from tasks.serving import registry
from tests.toymodels import (
    CORNER_CLASSES,
    CORNER_SPEC,
    CORNER_STATS,
    corner_data,
    corner_pixels,
    export_corner_variants,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

RULES = PromoteParams(max_f1_drop=0.005, max_int8_drop=0.003, max_latency_ratio=1.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, params: Params):
    """Three exported variants and an MLflow sqlite store with an experiment, both in tmp."""
    root = tmp_path_factory.mktemp("registry")
    quantize = params.quantize.model_copy(update={"calibration_size": 64})
    pt, fp32, int8 = export_corner_variants(root, quantize)
    with pytest.MonkeyPatch.context() as patch:
        # set_tracking_uri also sets MLFLOW_TRACKING_URI; the context puts it back after
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        experiment = mlflow.create_experiment("test", artifact_location=(root / "mlruns").as_uri())
        yield {"teacher": pt, "student": fp32, "student_int8": int8}, experiment
    mlflow.set_tracking_uri(None)


def _register(files: dict[str, Path], experiment: str) -> dict[str, registry.Registered]:
    metrics = {"student_int8": {"f1_macro": 0.9, "size_bytes": 123}}
    with mlflow.start_run(experiment_id=experiment):
        return registry.register_variants(files, metrics, {"git_commit": "abc"})


def _test_split(n: int = 64) -> Split:
    _, labels = corner_data(n, seed=3)
    return Split(images=corner_pixels(n, seed=3)[..., None], labels=labels.numpy())


def test_registers_each_variant_once_per_file_content(store) -> None:
    files, experiment = store
    first = _register(files, experiment)
    assert {v: (r.name, r.created) for v, r in first.items()} == {
        v: (f"visionpipe-{v}", True) for v in ("teacher", "student", "student_int8")
    }
    again = _register(files, experiment)  # nothing changed: no new version
    assert {v: (r.version, r.created) for v, r in again.items()} == {
        v: (first[v].version, False) for v in first
    }
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name = 'visionpipe-student_int8'")) == 1
    tags = client.get_model_version("visionpipe-student_int8", first["student_int8"].version).tags
    assert tags["source_md5"] == registry.file_md5(files["student_int8"])
    assert (tags["git_commit"], tags["f1_macro"], tags["size_bytes"]) == ("abc", "0.9", "123")


def test_registered_int8_model_loads_with_signature_and_preprocessing(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    model = mlflow.pyfunc.load_model(version.uri)
    meta = model.metadata.metadata
    assert meta["preprocessing"] == CORNER_SPEC.preprocessing()
    assert (meta["classes"], meta["variant"]) == (list(CORNER_CLASSES), "student_int8")
    (images,) = model.metadata.get_input_schema().inputs
    assert (images.name, images.shape) == ("images", (-1, 1, 16, 16))
    inputs = normalise(corner_pixels(8, seed=4)[..., None], CORNER_STATS)
    expected = onnx_logits(onnx_session(files["student_int8"], 1), inputs, batch_size=8)
    np.testing.assert_allclose(model.predict(inputs)["logits"], expected, rtol=1e-5, atol=1e-6)


def test_teacher_checkpoint_is_registered_as_onnx(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["teacher"]
    model = mlflow.pyfunc.load_model(version.uri)
    assert model.metadata.flavors.keys() >= {"onnx", "python_function"}
    assert model.predict(np.zeros((3, 1, 16, 16), np.float32))["logits"].shape == (3, 2)


def test_score_is_the_macro_f1_of_the_registered_model(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    test = _test_split()
    f1, how = registry.score(version.uri, test, CORNER_CLASSES)
    logits = onnx_logits(onnx_session(files["student_int8"], 1),
                         normalise(test.images, CORNER_STATS), batch_size=64)  # fmt: skip
    assert f1 == pytest.approx(f1_macro(test.labels, logits.argmax(1), 2))
    assert f1 > 0.9 and how == "scored on the test split"
    assert registry.score(version.uri, test, ("a", "b")) == (None, pytest.approx(
        "its classes ['blank', 'corner'] are not this test split's ['a', 'b']"))  # fmt: skip
    small = Split(images=test.images[:, :8, :8], labels=test.labels)
    f1, how = registry.score(version.uri, small, CORNER_CLASSES)
    assert f1 is None and "16x16x1" in how and "8x8x1" in how


def test_champion_alias_moves_and_loads(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    assert registry.champion_version() is None  # no alias before the first promotion
    registry.set_champion(version.version)
    assert registry.champion_version() == version.version
    model = mlflow.pyfunc.load_model("models:/visionpipe-student_int8@champion")
    assert model.metadata.metadata["source_md5"] == registry.file_md5(files["student_int8"])


def _candidate(version: str, f1: float | None, drop: float = 0.0, ratio: float = 0.5):
    return registry.Candidate(version, f1, int8_drop=drop, latency_ratio=ratio)


def test_first_challenger_within_budget_becomes_champion() -> None:
    decision = registry.decide(_candidate("1", 0.9), None, RULES)
    assert (decision.promote, decision.summary) == (True, "first champion")
    assert [c.name for c in decision.checks] == ["int8_f1_drop", "int8_latency_ratio_b64"]


@pytest.mark.parametrize(
    ("challenger", "expected", "failed"),
    [
        (_candidate("2", 0.896), True, None),  # 0.004 worse: within max_f1_drop
        (_candidate("2", 0.894), False, "f1_drop_vs_champion"),  # 0.006 worse
        (_candidate("2", 0.95, drop=0.004), False, "int8_f1_drop"),
        (_candidate("2", 0.95, ratio=1.2), False, "int8_latency_ratio_b64"),
        (registry.Candidate("2", 0.95), False, "int8_f1_drop"),  # budgets unknown: no promotion
    ],
)
def test_challenger_against_a_champion(challenger, expected, failed) -> None:
    decision = registry.decide(challenger, _candidate("1", 0.9), RULES)
    assert decision.promote is expected
    assert (failed is None) == decision.promote
    if failed:
        assert failed in decision.summary
        assert "| NO |" in decision.markdown()
    assert decision.metrics()["promoted"] == float(expected)


def test_same_version_is_kept_without_checks() -> None:
    same = _candidate("3", 0.9)
    decision = registry.decide(same, same, RULES)
    assert (decision.promote, decision.checks) == (False, ())
    assert "challenger is the champion" in decision.summary


def test_champion_that_cannot_be_scored_is_replaced_within_budget() -> None:
    decision = registry.decide(_candidate("2", 0.8), _candidate("1", None), RULES)
    assert decision.promote
    assert "f1_drop_vs_champion" not in [c.name for c in decision.checks]
