"""`visionpipe predict`: a tiny trained cnn, saved as .pt, fp32 and int8 ONNX, on a messy folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from flows.cli import main
from tasks.checkpoints import load_checkpoint, save_checkpoint
from tasks.inference import ModelError, Prediction
from tasks.params import Params
from tasks.serving.predict import collect_paths, load_model, pick_artifact, predict_paths
from tests.command_imports import modules_loaded_by
from tests.toymodels import (
    CORNER_CLASSES,
    CORNER_SPEC,
    CORNER_STATS,
    corner_pixels,
    export_corner_variants,
)

# torch's own exporter still calls a deprecated pytree API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

CLASSES, SPEC, STATS = CORNER_CLASSES, CORNER_SPEC, CORNER_STATS
GOOD = ("blank0.png", "corner1.png", "blank2.png", "corner3.png", "nested/deep/corner5.png")


@dataclass(frozen=True)
class Artifacts:
    pt: Path
    fp32: Path
    int8: Path
    old_pt: Path  # saved before checkpoints recorded their preprocessing
    old_onnx: Path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Artifacts:
    """Trained and exported once per module: the dynamo exporter takes a few seconds."""
    directory = tmp_path_factory.mktemp("models")
    # The real quantize settings, so this int8 file is built as the pipeline builds its own.
    quantize = params.quantize.model_copy(update={"calibration_size": 64})
    pt, fp32, int8 = export_corner_variants(directory, quantize)
    old_pt = save_checkpoint(directory / "old.pt", replace(load_checkpoint(pt), preprocessing=None))
    old = onnx.load(int8)
    for prop in old.metadata_props:
        if prop.key == "preprocessing":
            prop.value = "null"  # what quantize wrote before checkpoints carried it
    old_onnx = directory / "old_int8.onnx"
    onnx.save(old, old_onnx)
    return Artifacts(pt, fp32, int8, old_pt, old_onnx)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Good PNGs (nested too), a broken one, a truncated one, and files a walk must skip."""
    root = tmp_path / "images"
    pixels = corner_pixels(6, seed=1)
    for name in GOOD:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[int(path.stem[-1])]).save(path)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    whole = (root / "blank0.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) * 2 // 3])
    (root / "notes.txt").write_text("not an image\n")
    Image.fromarray(pixels[1]).save(root / ".hidden.png")
    return root


def _by_name(predictions: list[Prediction], root: Path) -> dict[str, Prediction]:
    return {Path(p.path).relative_to(root).as_posix(): p for p in predictions}


def test_folder_with_broken_files_reports_them_and_predicts_the_rest(
    artifacts: Artifacts, folder: Path
) -> None:
    model = load_model(str(artifacts.int8))
    assert (model.runtime, model.classes, model.spec) == ("onnxruntime", CLASSES, SPEC)
    found = _by_name(predict_paths(model, collect_paths([folder]), top_k=3), folder)
    # sorted walk, hidden files and non-image suffixes skipped
    assert list(found) == sorted([*GOOD, "broken.png", "truncated.png"])
    assert (found["broken.png"].error, found["truncated.png"].error) == (
        "not_an_image",
        "truncated",
    )
    assert found["truncated.png"].detail
    for name in GOOD:
        top = found[name].top_k
        assert len(top) == 2  # top_k capped at the number of classes
        label, probability = top[0]
        assert label == ("corner" if "corner" in name else "blank")
        assert probability > 0.5 and top[0][1] >= top[1][1]
        assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-5)


def test_cli_prints_one_line_per_image_and_exits_1_on_a_broken_file(
    artifacts: Artifacts, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--model", str(artifacts.int8), "--top-k", "1"]) == 1
    captured = capsys.readouterr()
    lines = dict(line.split(": ", 1) for line in captured.out.splitlines())
    assert len(lines) == len(GOOD) + 2
    assert lines[str(folder / "corner1.png")].startswith("corner 0.")
    assert lines[str(folder / "blank0.png")].startswith("blank 0.")
    assert lines[str(folder / "broken.png")].startswith("ERROR not_an_image (")
    assert "student_int8.onnx" in captured.err  # which model answered, off stdout
    assert (
        main(["predict", *(str(folder / name) for name in GOOD), "--model", str(artifacts.int8)])
        == 0
    )


def test_cli_json_lists_the_same_paths(
    artifacts: Artifacts, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(folder), "--model", str(artifacts.int8), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [row["path"] for row in rows] == [str(p) for p in collect_paths([folder])]
    errors = {Path(row["path"]).name: row for row in rows if "error" in row}
    assert errors["broken.png"]["error"] == "not_an_image" and errors["broken.png"]["detail"]
    assert errors["truncated.png"]["error"] == "truncated"
    good = [row for row in rows if "top_k" in row]
    assert len(good) == len(GOOD)
    assert all(set(row["top_k"][0]) == {"label", "probability"} for row in good)


def test_checkpoint_and_int8_agree_on_top1(artifacts: Artifacts, folder: Path) -> None:
    paths = collect_paths([folder])
    by_runtime = {}
    for artifact in (artifacts.pt, artifacts.fp32, artifacts.int8):
        model = load_model(str(artifact))
        by_runtime[artifact.name] = [p.top_k[0][0] for p in predict_paths(model, paths) if p.ok]
    assert load_model(str(artifacts.pt)).runtime == "torch"
    assert by_runtime["student.pt"] == by_runtime["student_int8.onnx"]
    assert by_runtime["student.pt"] == by_runtime["student.onnx"]


def test_preprocessing_comes_from_the_artifact_not_params_yaml(
    artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("data:\n  image_size: 32\n  channels: 3\n  resize: pad\n")
    Path("models").mkdir()
    shutil.copy(artifacts.int8, "models/student_int8.onnx")  # the default variant's path
    big = np.full((32, 32, 3), 128, np.uint8)
    big[:10, :10] = 255  # stretched to 16x16, the 5x5 corner the model learned
    Image.fromarray(big).save("big.png")
    model = load_model("student_int8")
    assert model.spec == SPEC
    [prediction] = predict_paths(model, [Path("big.png")])
    assert prediction.top_k[0][0] == "corner"


@pytest.mark.parametrize("which", ["old_pt", "old_onnx"])
def test_an_artifact_without_preprocessing_says_to_rebuild(
    artifacts: Artifacts, which: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(getattr(artifacts, which))
    with pytest.raises(ModelError, match=r"predates preprocessing metadata.*dvc repro"):
        load_model(path)
    assert main(["predict", str(folder), "--model", path]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("visionpipe: ") and not captured.out


def test_unknown_or_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="teacher, student, student_int8"):
        load_model("mobilenet")
    with pytest.raises(ModelError, match=r"models/teacher.pt does not exist.*dvc repro"):
        load_model("teacher")
    Path("notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"\.onnx or \.pt"):
        load_model("notes.txt")


def test_missing_paths_and_empty_folders_are_reported(artifacts: Artifacts, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    paths = collect_paths([tmp_path / "nowhere.png", tmp_path / "empty"])
    predictions = predict_paths(load_model(str(artifacts.int8)), paths)
    assert [p.error for p in predictions] == ["not_found", "no_images"]


def test_pick_artifact_prefers_the_one_int8_onnx(tmp_path: Path) -> None:
    for name in ("student.onnx", "student_int8.onnx", "student.pt"):
        (tmp_path / name).touch()
    assert pick_artifact(tmp_path).name == "student_int8.onnx"
    (tmp_path / "teacher_int8.onnx").touch()
    with pytest.raises(ModelError, match=r"several models.*student_int8\.onnx.*teacher_int8"):
        pick_artifact(tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ModelError, match=r"no \.onnx or \.pt"):
        pick_artifact(tmp_path / "nothing")


def test_an_mlflow_runs_uri(
    artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's default experiment keeps its files in the cwd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = mlflow.create_experiment("predict", (tmp_path / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            for path in (artifacts.fp32, artifacts.int8):  # as in a folder of both exports
                mlflow.log_artifact(str(path), "model")
        model = load_model(f"runs:/{run.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    assert model.artifact == "model/student_int8.onnx"
    image = np.full((16, 16), 128, np.uint8)
    image[:5, :5] = 255
    Image.fromarray(image).save(tmp_path / "corner.png")
    [prediction] = predict_paths(model, [tmp_path / "corner.png"])
    assert prediction.top_k[0][0] == "corner"


@pytest.mark.integration
def test_predict_loads_inference_code_only(artifacts: Artifacts, folder: Path, tmp_path: Path):
    modules, out = modules_loaded_by(
        tmp_path, "predict", "--model", str(artifacts.int8), str(folder)
    )
    assert "corner1.png" in out  # it predicted
    assert "tasks.serving.predict" in modules and "onnxruntime" in modules
    not_inference = ("tasks.training", "tasks.export.quantize", "tasks.export.qat", "prefect",
                     "mlflow", "albumentations", "matplotlib")  # fmt: skip
    assert {m for m in modules if m.startswith(not_inference)} == set()
