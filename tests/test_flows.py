"""Prefect is the thing under test here: flows run under prefect_test_harness and record tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.prepare import prepare_flow
from flows.resample import resample_flow
from tasks.artifacts import read_json
from tasks.data.datasets import Split, load_prepared, write_prepared
from tasks.data.pixels import ChannelStats
from tasks.layout import DATA_QUALITY, PREPARED_DIR, RESAMPLED_DIR, metrics_path
from tasks.params import AuditParams, DataParams, Params, ResampleParams
from tests.imagefolders import GOOD_PER_CLASS, build_messy_folder, noise

pytestmark = pytest.mark.integration  # real Prefect/MLflow servers

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def prepared_on_disk(tmp_path, monkeypatch):
    """A tiny imbalanced prepared dataset (counts 12/6/3) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [12, 6, 3])
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 1), dtype=np.uint8)
    split = Split(images, labels)
    write_prepared(
        tmp_path / "data/prepared",
        {"train": split, "val": split, "test": split},
        CLASSES,
        ChannelStats.of(images),
    )
    return tmp_path


def _task_names(flow_run_id, expected: int) -> list[str]:
    """The task runs the API recorded for a flow run, sorted by name. Prefect 3 records
    task runs from events, asynchronously: wait (up to 30 s) until ``expected`` are in."""
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        if len(runs) >= expected or time.monotonic() > deadline:
            return sorted(run.name.rsplit("-", 1)[0] for run in runs)
        time.sleep(0.5)


def test_resample_flow_completes_and_records_each_task(harness, prepared_on_disk):
    params = ResampleParams(
        strategy="random_over", sampling_strategy="auto", k_neighbors=2, space="pixels",
        embedding_checkpoint=None,
    )  # fmt: skip
    untouched = {p: p.read_bytes() for p in sorted(PREPARED_DIR.rglob("*")) if p.is_file()}
    state = resample_flow(seed=0, resample=params, return_state=True)

    assert state.is_completed()
    metrics = state.result()
    assert metrics["class_counts_after"] == {"a": 12, "b": 12, "c": 12}
    assert metrics_path("resample").is_file()
    assert len(np.load(RESAMPLED_DIR / "indices.npy")) == 36
    assert _task_names(state.state_details.flow_run_id, 2) == ["resample", "write-resampled"]
    # val and test (and the prepared train split itself) are never touched
    assert {p: p.read_bytes() for p in sorted(PREPARED_DIR.rglob("*")) if p.is_file()} == untouched


def test_adasyn_where_undefined_falls_back_to_smote_and_says_so_in_the_teacher_run(
    harness, params, tmp_path, monkeypatch
):
    """Long-tailed, well separated classes: ADASYN's density ratios are 0/0. The
    scheduled retrain must not die of a data property: SMOTE, with a warning in
    metrics/resample.json and on the teacher's MLflow run."""
    import mlflow

    from flows.train import train_flow
    from tasks.data.baselines import trivial_baselines, write_baselines

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [20, 8, 4])
    images = np.clip(rng.normal(20 + 100 * labels[:, None, None, None], 3, (32, 8, 8, 1)), 0, 255)
    split = Split(images.astype(np.uint8), labels)
    write_prepared(PREPARED_DIR, {"train": split, "val": split, "test": split}, CLASSES,
                   ChannelStats.of(split.images))  # fmt: skip
    adasyn = ResampleParams(
        strategy="adasyn", sampling_strategy="auto", k_neighbors=3, space="pixels",
        embedding_checkpoint=None,
    )  # fmt: skip
    state = resample_flow(seed=0, resample=adasyn, return_state=True)

    assert state.is_completed()
    metrics = read_json(metrics_path("resample"))
    assert metrics["strategy"] == "adasyn" and metrics["strategy_used"] == "smote"
    assert metrics["class_counts_after"] == {"a": 20, "b": 20, "c": 20}
    assert len(metrics["warnings"]) == 1 and "fell back to SMOTE" in metrics["warnings"][0]

    write_baselines(PREPARED_DIR, trivial_baselines(load_prepared(PREPARED_DIR), seed=0))
    tiny = {"model": "cnn", "pretrained": False, "width": 4, "epochs": 1, "min_steps": 0,
            "batch_size": 8, "device": "cpu", "allow_weak": True}  # fmt: skip
    train = params.train.model_copy(update=tiny)
    assert train_flow(seed=0, train=train, augment=params.augment, mlflow=params.mlflow,
                      return_state=True).is_completed()  # fmt: skip
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    assert run.data.tags["resample_warnings"] == metrics["warnings"][0]


def test_a_failing_task_fails_the_flow_and_leaves_no_output(harness, prepared_on_disk):
    # Undersampling to a float ratio is for two classes only: a clear error, no output.
    params = ResampleParams(
        strategy="random_under", sampling_strategy=0.5, k_neighbors=5, space="pixels",
        embedding_checkpoint=None,
    )  # fmt: skip
    state = resample_flow(seed=0, resample=params, return_state=True)

    assert state.is_failed()
    with pytest.raises(ValueError, match=r"resample\.sampling_strategy=0\.5"):
        state.result()
    assert not RESAMPLED_DIR.exists()
    assert not metrics_path("resample").exists()


def _no_groups(params: Params) -> AuditParams:
    """Prepare on its own, without the audit stage's clusters (tests/test_audit.py runs both)."""
    return params.audit.model_copy(update={"split_groups": False})


def _folder_params(params: Params, source: Path, **update: object) -> DataParams:
    settings = {"source": str(source), "image_size": 12, "channels": 3, "resize": "pad"}
    settings |= {"min_size": 8, "min_per_class": 5, "max_per_class": None, "workers": 2}
    return DataParams(**{**params.data.model_dump(), **settings, **update})


def test_prepare_flow_on_a_messy_image_folder(harness, params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = build_messy_folder(tmp_path / "data/raw/messy")
    state = prepare_flow(
        seed=0,
        audit=_no_groups(params),
        data=_folder_params(params, "data/raw/messy"),
        return_state=True,
    )

    assert state.is_completed()
    quality = read_json(DATA_QUALITY)
    root = "data/raw/messy/"
    assert {q["path"].removeprefix(root): q["reason"] for q in quality["quarantined"]} == (
        expected["quarantined"]
    )
    assert quality["content_versioned"] is True
    assert quality["ignored"] == {
        "hidden": 3,
        "not_an_image_suffix": 1,
        "outside_a_class_folder": 1,
    }
    kinds = quality["conversions"]["by_kind"]
    for kind in set(expected["converted"].values()):
        assert kinds[kind] >= 1, kind
    assert quality["conversions"]["formats"].keys() >= {"BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP"}
    assert quality["duplicates"]["dropped"] == 1

    prepared = load_prepared(PREPARED_DIR)
    assert prepared.image_shape == (12, 12, 3)
    stored = sum(len(getattr(prepared, name)) for name in ("train", "val", "test"))
    # b/good1.png has a twin in class a (both quarantined); c's copy of good0.png is dropped
    assert stored == 3 * GOOD_PER_CLASS - 1 + len(expected["converted"])
    assert read_json(metrics_path("prepare"))["images"] == stored
    counts = quality["class_counts"]
    assert sum(sum(c.values()) for c in counts.values()) == stored
    # no stored image sits in two splits
    seen = {
        name: {row.tobytes() for row in np.asarray(getattr(prepared, name).images)}
        for name in ("train", "val", "test")
    }
    assert not (
        seen["train"] & seen["test"] or seen["train"] & seen["val"] or seen["val"] & seen["test"]
    )
    assert _task_names(state.state_details.flow_run_id, 6) == [
        "decode", "load-source", "report", "select", "split", "write-prepared",
    ]  # fmt: skip


def _hostile_folder(root: Path, outside: Path):
    """Three classes of good PNGs, a messy folder's broken files, and every trap a
    file system can set; returns prepare's expected quarantine and the open socket:
    a FIFO, a socket, a directory loop, links out of the root
    (to a PNG and to /dev/zero), a link to another class's folder, a dangling and
    a self-referencing link."""
    import os
    import socket

    expected = build_messy_folder(root)["quarantined"]
    outside.mkdir()
    Image.fromarray(noise((16, 16), 99)).save(outside / "secret.png")
    os.mkfifo(root / "a/fifo.png")
    (root / "a/loop").symlink_to("..")  # a/loop/a/loop/... without end
    (root / "a/outside.png").symlink_to(outside / "secret.png")
    (root / "a/zero.png").symlink_to("/dev/zero")
    (root / "b/other_class").symlink_to("../c")  # c's images again, labelled b
    (root / "b/alias.png").symlink_to("good3.png")  # inside the root: followed
    (root / "c/dangling.png").symlink_to("missing.png")
    (root / "c/self.png").symlink_to("self.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "c/socket.png"))
    return expected, sock


def test_a_hostile_folder_cannot_stall_or_crash_prepare(harness, params, tmp_path, monkeypatch):
    import signal

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/raw/hostile"
    expected, sock = _hostile_folder(root, tmp_path / "outside")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("prepare hung on the hostile folder"))
    signal.alarm(300)
    try:
        start = time.monotonic()
        state = prepare_flow(
            seed=0, audit=_no_groups(params), data=_folder_params(params, root), return_state=True
        )
        seconds = time.monotonic() - start
    finally:
        signal.alarm(0)
        sock.close()

    assert state.is_completed(), state
    assert seconds < 120
    quality = read_json(DATA_QUALITY)
    reasons = {q["path"].removeprefix(f"{root}/"): q["reason"] for q in quality["quarantined"]}
    assert reasons == expected | {
        "a/fifo.png": "not_a_file",
        "c/socket.png": "not_a_file",
        "c/dangling.png": "broken_symlink",
        "c/self.png": "unreadable",
    }
    assert quality["ignored"] == {
        "folder_listed_twice": 1,  # b/other_class: c is listed as c only
        "hidden": 3,
        "not_an_image_suffix": 1,
        "outside_a_class_folder": 1,
        "symlink_loop": 1,  # a/loop
        "symlink_outside_root": 2,  # a/outside.png, a/zero.png: never opened
    }
    # a/loop, b/other_class, b/alias.png, c/dangling.png, c/self.png stay inside the root
    assert quality["symlinks_followed"] == {"inside_root": 5}
    assert not any("secret" in q["path"] for q in quality["quarantined"])


def test_prepare_follows_links_out_of_the_root_only_when_asked(
    harness, params, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/raw/hostile"
    _, sock = _hostile_folder(root, tmp_path / "outside")
    try:
        data = _folder_params(params, root, symlinks="follow")
        assert prepare_flow(
            seed=0, audit=_no_groups(params), data=data, return_state=True
        ).is_completed()
    finally:
        sock.close()
    quality = read_json(DATA_QUALITY)
    reasons = {q["path"].removeprefix(f"{root}/"): q["reason"] for q in quality["quarantined"]}
    assert reasons["a/zero.png"] == "not_a_file"  # the device is looked at, never read
    assert "a/outside.png" not in reasons  # the PNG outside the root is stored
    assert quality["symlinks_followed"] == {"inside_root": 5, "outside_root": 2}
    assert "symlink_outside_root" not in quality["ignored"]


def test_prepare_flow_fails_fast_and_writes_nothing_when_a_class_is_too_small(
    harness, params, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    build_messy_folder(tmp_path / "messy")
    data = _folder_params(params, tmp_path / "messy", min_per_class=GOOD_PER_CLASS + 5)
    state = prepare_flow(seed=0, audit=_no_groups(params), data=data, return_state=True)

    assert state.is_failed()
    with pytest.raises(ValueError, match=r"fewer than data.min_per_class=15 usable images"):
        state.result()
    assert not PREPARED_DIR.exists()
    assert not DATA_QUALITY.exists()
    assert not metrics_path("prepare").exists()
    assert not list((tmp_path / "data").glob(".*"))  # no staging left behind


def test_train_refuses_a_model_that_learned_nothing_unless_allowed(
    harness, params, prepared_on_disk, monkeypatch
):
    """Noise images: no CNN beats a linear model that saw the very same (val = train) images."""
    import mlflow

    # Its own store: an earlier test's mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI.
    store = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    from flows.train import train_flow
    from tasks.data.baselines import WeakModelError, trivial_baselines, write_baselines
    from tasks.layout import TEACHER, TEACHER_ONNX

    none = ResampleParams(
        strategy="none", sampling_strategy="auto", k_neighbors=2, space="pixels",
        embedding_checkpoint=None,
    )  # fmt: skip
    assert resample_flow(seed=0, resample=none, return_state=True).is_completed()
    write_baselines(PREPARED_DIR, trivial_baselines(load_prepared(PREPARED_DIR), seed=0))
    tiny = {"model": "cnn", "pretrained": False, "width": 4, "epochs": 1, "min_steps": 0,
            "batch_size": 8, "device": "cpu"}  # fmt: skip
    strict = params.train.model_copy(update={**tiny, "allow_weak": False})
    state = train_flow(seed=0, train=strict, augment=params.augment, mlflow=params.mlflow,
                       return_state=True)  # fmt: skip
    assert state.is_failed()
    with pytest.raises(WeakModelError, match=r"does not beat the (linear|majority) baseline"):
        state.result()
    shipped = (TEACHER, TEACHER_ONNX, metrics_path("train"))
    assert not any(path.exists() for path in shipped)  # nothing shipped

    lenient = params.train.model_copy(update={**tiny, "allow_weak": True})
    state = train_flow(seed=0, train=lenient, augment=params.augment, mlflow=params.mlflow,
                       return_state=True)  # fmt: skip
    assert state.is_completed()
    metrics = read_json(metrics_path("train"))
    assert metrics["weak"] is True and metrics["baseline"] in ("linear", "majority")
    assert metrics["required_val_f1_macro"] > metrics["best_val_f1_macro"]
    assert TEACHER.is_file()
    # the teacher in ONNX, as the registry gets it: its classes and its variant named
    teacher = onnx.load(TEACHER_ONNX)
    meta = {entry.key: entry.value for entry in teacher.metadata_props}
    assert json.loads(meta["variant"]) == "teacher" and json.loads(meta["classes"])
    assert teacher.graph.input[0].name == "images"
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    tags = {r.info.status: r.data.tags.get("weak_model") for r in runs}
    assert tags == {"FAILED": None, "FINISHED": "true"}


def test_the_audit_flow_then_prepare_keeps_copies_together_and_drops_excluded_files(
    harness, params, tmp_path, monkeypatch
):
    from benchmarks.audit import near_copy
    from benchmarks.messy_folder import build as build_shapes
    from flows.audit import audit_flow
    from tasks.layout import AUDIT_DIR, AUDIT_GALLERY_DIR, AUDIT_REPORT

    monkeypatch.chdir(tmp_path)
    # Its own store: an earlier test in this worker may have exported the URL of an
    # MLflow server it has since stopped (seen when pytest-xdist ordered the files
    # differently: "Connection refused").
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "data/raw/shapes"
    build_shapes(root, seed=5, largest=12, smallest=12)
    rng = np.random.default_rng(0)
    originals = sorted(root.glob("circle/*"))[:3]
    for path in originals:
        with Image.open(path) as image:
            near_copy(image, rng).save(path.with_name(f"{path.stem}_copy.jpg"))
    (root / "star/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "star/blank.png")
    excluded = sorted(root.glob("ring/*"))[0].relative_to(tmp_path)  # as prepare names it
    Path("exclude.txt").write_text(f"# dropped\n{excluded}\n")
    data = _folder_params(params, "data/raw/shapes", image_size=32, resize="stretch")
    audit = params.audit.model_copy(update={"exclude": Path("exclude.txt")})

    state = audit_flow(seed=0, data=data, audit=audit, mlflow=params.mlflow, return_state=True)
    assert state.is_completed(), state
    report = read_json(AUDIT_REPORT)
    clusters = {frozenset(Path(p).name for p in members) for members in report["clusters"]}
    for path in originals:
        assert frozenset({path.name, f"{path.stem}_copy.jpg"}) in clusters
    assert report["not_embedded"] == [{"path": "data/raw/shapes/star/broken.png",
                                       "reason": "not_an_image"}]  # fmt: skip
    kinds = {(Path(r["path"]).name, r["kind"]) for r in report["flagged"]}
    assert ("blank.png", "blank") in kinds
    assert not any(str(excluded) == r["path"] for r in report["flagged"])
    metrics = read_json(metrics_path("audit"))
    assert metrics["excluded"] == 1 and metrics["not_embedded"] == 1
    assert metrics["embedded"] == metrics["images"] - 2
    assert (AUDIT_DIR / "embeddings.npy").is_file()
    assert "cluster 0" in (AUDIT_GALLERY_DIR / "index.html").read_text()
    assert _task_names(state.state_details.flow_run_id, 5) == [
        "decode", "embed", "find", "load-source", "write-audit",
    ]  # fmt: skip

    state = prepare_flow(seed=0, data=data, audit=audit, return_state=True)
    assert state.is_completed(), state
    quality = read_json(DATA_QUALITY)
    assert {q["path"]: q["reason"] for q in quality["quarantined"]}[str(excluded)] == "excluded"
    grouping = quality["near_duplicates"]
    assert grouping["grouped"] and grouping["across_splits"] == []
    assert grouping["kept_together"] >= 3
