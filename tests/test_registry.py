"""The model registry and the promotion rule, against a real MLflow store (sqlite in tmp).

The three files are a tiny trained model exported exactly as the pipeline
exports its own (``tests/toymodels.py``), so what is registered, loaded back
through ``mlflow.pyfunc`` and scored is the real thing, only smaller.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import mlflow.onnx
import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from PIL import Image

from tasks.data.datasets import Split
from tasks.data.pixels import normalise
from tasks.inference import onnx_logits, onnx_session
from tasks.metrics import f1_macro
from tasks.params import Params, PromoteParams
from tasks.servers import free_port, healthy
from tasks.serving import registry
from tasks.serving.predict import file_md5, load_model, predict_paths
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
    assert tags["source_md5"] == file_md5(files["student_int8"])
    assert (tags["git_commit"], tags["f1_macro"], tags["size_bytes"]) == ("abc", "0.9", "123")
    assert tags["pyfunc_input"] == "image"


def test_a_version_that_takes_only_tensors_is_registered_again_once(store) -> None:
    """What an upgrade meets: the same file registered in the old form (no pyfunc_input tag)."""
    files, experiment = store
    before = _register(files, experiment)["student"]
    client = mlflow.MlflowClient()
    client.delete_model_version_tag(before.name, before.version, "pyfunc_input")
    again = _register(files, experiment)["student"]
    assert again.created and int(again.version) == int(before.version) + 1
    assert not _register(files, experiment)["student"].created


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight corner images as PNG files: what a user sends."""
    folder = tmp_path_factory.mktemp("pngs")
    paths = [folder / f"image{i}.png" for i in range(8)]
    for path, pixels in zip(paths, corner_pixels(8, seed=4), strict=True):
        path.write_bytes(_png(pixels))
    return paths


def _rows(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"image": [p.read_bytes() for p in paths], "name": [str(p) for p in paths]})


def test_registered_model_takes_image_files_and_answers_as_predict_does(store, pngs) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    model = mlflow.pyfunc.load_model(version.uri)
    meta = model.metadata.metadata
    assert meta["preprocessing"] == CORNER_SPEC.preprocessing()
    assert (meta["classes"], meta["variant"]) == (list(CORNER_CLASSES), "student_int8")
    schema = model.metadata.get_input_schema()
    assert [(c.name, c.type.name, c.required) for c in schema.inputs] == [
        ("image", "binary", True), ("name", "string", False)]  # fmt: skip
    expected = [p.to_json() for p in predict_paths(load_model(str(files["student_int8"])), pngs, 2)]
    assert model.predict(_rows(pngs), params={"top_k": 2}) == expected
    assert {answer["top_k"][0]["label"] for answer in expected} == set(CORNER_CLASSES)
    # Without names, each answer is labelled by its row; top_k defaults to 3 (capped at 2 classes).
    unnamed = model.predict(pd.DataFrame({"image": [pngs[0].read_bytes()]}))
    assert unnamed == [{"path": "0", "top_k": expected[0]["top_k"]}]
    # Other formats prepare reads are decoded the same way: a JPEG and a 16-bit TIFF.
    others = [pngs[0].with_suffix(".jpg"), pngs[1].with_suffix(".tif")]
    Image.open(pngs[0]).save(others[0], quality=90)
    wide = np.asarray(Image.open(pngs[1]), np.uint16) * 257
    Image.fromarray(wide).save(others[1])
    expected = [p.to_json() for p in predict_paths(load_model(str(files["student_int8"])), others)]
    assert model.predict(_rows(others)) == expected
    assert all("top_k" in answer for answer in expected)


def test_a_row_that_is_not_a_usable_image_gets_prepares_reason(store, pngs) -> None:
    files, experiment = store
    model = mlflow.pyfunc.load_model(_register(files, experiment)["student_int8"].uri)
    good = pngs[0].read_bytes()
    rows = pd.DataFrame({"image": [b"not an image", good[: len(good) // 2], b"", good]})
    answers = model.predict(rows)
    assert [a.get("error") for a in answers] == ["not_an_image", "truncated", "empty_file", None]
    assert answers[3]["top_k"][0]["probability"] > 0.5


def test_a_saved_model_folder_is_the_logged_model(store, pngs, tmp_path) -> None:
    """``save_image_model`` (what benchmarks/serve_load.py --server mlflow serves) logs nothing."""
    files, experiment = store
    logged = mlflow.pyfunc.load_model(_register(files, experiment)["student_int8"].uri)
    folder = registry.save_image_model(tmp_path / "model", files["student_int8"])
    saved = mlflow.pyfunc.load_model(str(folder))
    assert saved.predict(_rows(pngs)) == logged.predict(_rows(pngs))
    assert saved.metadata.flavors.keys() == logged.metadata.flavors.keys()
    assert saved.metadata.metadata["source_md5"] == logged.metadata.metadata["source_md5"]


def test_the_tensor_graph_is_the_models_onnx_artifact(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    info = mlflow.models.get_model_info(version.uri)
    assert info.flavors.keys() == {"python_function"}  # logged by mlflow.pyfunc.log_model
    assert info.flavors["python_function"]["artifacts"].keys() == {"onnx"}
    tensors = ModelSignature.from_dict(info.metadata["tensor_signature"])
    (images,) = tensors.inputs.inputs
    assert (images.name, images.shape) == ("images", (-1, 1, 16, 16))
    graph = registry.onnx_graph(version.uri)
    assert graph.SerializeToString() == files["student_int8"].read_bytes()
    inputs = normalise(corner_pixels(8, seed=4)[..., None], CORNER_STATS)
    served = onnx_logits(onnx_session(graph.SerializeToString(), 1), inputs, batch_size=8)
    expected = onnx_logits(onnx_session(files["student_int8"], 1), inputs, batch_size=8)
    np.testing.assert_array_equal(served, expected)


def test_a_version_with_the_older_onnx_flavour_is_scored_the_same(store) -> None:
    """Versions an older visionpipe registered carry an ``onnx`` flavour, not the artifact."""
    files, experiment = store
    new = _register(files, experiment)["student_int8"]
    graph = registry.onnx_graph(new.uri)
    with mlflow.start_run(experiment_id=experiment):
        older = mlflow.onnx.log_model(
            graph, name="older", registered_model_name="older-onnx",
            metadata=mlflow.models.get_model_info(new.uri).metadata,
            pip_requirements=["onnx", "onnxruntime"],
        )  # fmt: skip
    assert registry.onnx_graph(older.model_uri).graph.input[0].name == "images"
    test = _test_split()
    assert registry.score(older.model_uri, test, CORNER_CLASSES) == registry.score(
        new.uri, test, CORNER_CLASSES
    )


@pytest.mark.integration
def test_the_model_runs_where_this_repository_cannot_be_imported(store, pngs) -> None:
    """The pyfunc's code travels inside the model: a process without ``tasks`` serves it."""
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    local = Path(mlflow.artifacts.download_artifacts(version.uri))
    shipped = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*.py"))
    assert shipped == sorted(
        [f"visionpipe_model/{f}" for f in registry.SHIPPED]
        + ["visionpipe_model/__init__.py", "visionpipe_model/data/__init__.py",
           "visionpipe_model/serving/__init__.py"])  # fmt: skip
    assert (local / registry.MODEL_CODE.name).is_file()  # the model file, run at load time
    script = (
        "import json, sys\n"
        "sys.modules['tasks'] = None  # any `import tasks...` now raises ImportError\n"
        "import mlflow.pyfunc, pandas\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "rows = pandas.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[2:]]})\n"
        "print(json.dumps(model.predict(rows)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(local), *map(str, pngs)],
        capture_output=True, text=True, timeout=120, cwd=local,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    in_process = mlflow.pyfunc.load_model(version.uri).predict(_rows(pngs))
    labels = [a["top_k"][0]["label"] for a in json.loads(done.stdout.splitlines()[-1])]
    assert labels == [a["top_k"][0]["label"] for a in in_process]


@pytest.mark.integration
def test_mlflow_models_serve_answers_images_from_the_champion(store, pngs) -> None:
    """The documented command: ``mlflow models serve`` on the alias, with base64 PNGs."""
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    registry.set_champion(version.version)
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", "models:/visionpipe-student_int8@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as served:  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while not healthy(url):
                assert served.poll() is None and time.monotonic() < deadline, served.stdout.read()
                time.sleep(0.5)
            data = [[base64.b64encode(p.read_bytes()).decode(), str(p)] for p in pngs]
            body = {"dataframe_split": {"columns": ["image", "name"], "data": data},
                    "params": {"top_k": 1}}  # fmt: skip
            answer = httpx.post(f"{url}/invocations", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            expected = predict_paths(load_model(str(files["student_int8"])), pngs, top_k=1)
            assert answer.json() == {"predictions": [p.to_json() for p in expected]}
            cut = pngs[0].read_bytes()[:100]
            bad = {"dataframe_records": [{"image": base64.b64encode(cut).decode(), "name": "cut"}]}
            answer = httpx.post(f"{url}/invocations", json=bad, timeout=30)
            assert answer.status_code == 200, answer.text
            (row,) = answer.json()["predictions"]
            assert (row["path"], row["error"]) == ("cut", "truncated")
        finally:
            served.terminate()
            served.wait(timeout=30)
            # The store is shared: later tests start before the first promotion.
            mlflow.MlflowClient().delete_registered_model_alias(
                "visionpipe-student_int8", registry.CHAMPION
            )


def test_teacher_checkpoint_is_registered_as_onnx_that_takes_images(store, pngs) -> None:
    files, experiment = store
    version = _register(files, experiment)["teacher"]
    model = mlflow.pyfunc.load_model(version.uri)
    assert model.metadata.flavors.keys() == {"python_function"}
    answers = model.predict(_rows(pngs[:3]))
    assert [len(a["top_k"]) for a in answers] == [2, 2, 2]
    assert registry.onnx_graph(version.uri).graph.input[0].name == "images"


def test_score_is_the_macro_f1_of_the_registered_model(store) -> None:
    files, experiment = store
    version = _register(files, experiment)["student_int8"]
    test = _test_split()
    f1, how = registry.score(version.uri, test, CORNER_CLASSES)
    logits = onnx_logits(onnx_session(files["student_int8"], 1),
                         normalise(test.images, CORNER_STATS), batch_size=64)  # fmt: skip
    assert f1 == pytest.approx(f1_macro(test.labels, logits.argmax(1), 2))
    assert f1 > 0.9 and how == "scored on the test split"
    # The image pyfunc, given the same images as PNG files, labels them the same way.
    model = mlflow.pyfunc.load_model(version.uri)
    answers = model.predict(pd.DataFrame({"image": [_png(image[..., 0]) for image in test.images]}))
    predicted = [CORNER_CLASSES.index(a["top_k"][0]["label"]) for a in answers]
    assert predicted == logits.argmax(1).tolist()
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
    assert model.metadata.metadata["source_md5"] == file_md5(files["student_int8"])


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
