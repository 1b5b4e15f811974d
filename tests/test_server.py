"""``visionpipe serve-model``: a real HTTP server on a tiny trained model, good and bad uploads."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.serve_load import multipart, rss_kb
from tasks.serving.predict import load_model, predict_paths
from tasks.serving.server import ModelServer, ModelSlot
from tests.toymodels import corner_pixels, export_corner_variants

ROOT = Path(__file__).resolve().parents[1]
JSON = "application/json"
# torch's own exporter still calls a deprecated pytree API; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.integration,  # a real server on loopback
]


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory, params) -> Path:
    quantize = params.quantize.model_copy(update={"calibration_size": 64})
    return export_corner_variants(tmp_path_factory.mktemp("models"), quantize)[2]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, pixels in enumerate(corner_pixels(8, seed=3)):
        path = folder / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(int8: Path) -> Iterator[ModelServer]:
    slot = ModelSlot(str(int8), threads=1, refresh_s=30, log=lambda line: None)
    running = ModelServer(("127.0.0.1", 0), slot, max_bytes=2**20, max_pixels=1_000_000)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


def _request(server: ModelServer, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, dict]:  # fmt: skip
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        # refused before the whole body was sent (413): its answer is there to read
        with contextlib.suppress(BrokenPipeError):
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _post_files(server: ModelServer, files: list[tuple[str, bytes]]) -> tuple[int, dict]:
    body, content_type = multipart(files)
    return _request(server, "POST", "/predict", body, {"Content-Type": content_type})


def test_health_names_the_model(server: ModelServer, int8: Path) -> None:
    status, reply = _request(server, "GET", "/health")
    assert status == 200 and reply["status"] == "ok"
    assert reply["model"]["name"] == int8.name and len(reply["model"]["version"]) == 12
    assert reply["classes"] == ["blank", "corner"]


def test_uploads_get_the_labels_visionpipe_predict_gives(server, int8, pngs) -> None:
    expected = [p.to_json() for p in predict_paths(load_model(str(int8)), pngs)]
    status, reply = _post_files(server, [(p.name, p.read_bytes()) for p in pngs])
    assert status == 200
    got = reply["predictions"]
    assert [g["path"] for g in got] == [p.name for p in pngs]
    for mine, theirs in zip(got, expected, strict=True):
        assert [t["label"] for t in mine["top_k"]] == [t["label"] for t in theirs["top_k"]]
        assert mine["top_k"][0]["probability"] == pytest.approx(theirs["top_k"][0]["probability"])
    assert reply["model"]["name"] == int8.name
    # the same images as JSON with base64
    document = {"files": [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()}
                          for p in pngs]}  # fmt: skip
    status, as_json = _request(server, "POST", "/predict", json.dumps(document).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200 and as_json["predictions"] == got


def _bomb() -> bytes:
    """A small PNG whose header promises 2000x2000 pixels: above this server's 1M."""
    out = io.BytesIO()
    Image.new("1", (2000, 2000)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("files", "status", "reason"),
    [
        ([("notes.png", b"just some text, not an image")], 400, "not_an_image"),
        ([("empty.png", b"")], 400, "empty_file"),
        ([("bomb.png", None)], 413, "too_large"),
    ],
)
def test_a_bad_file_gets_its_status_and_prepares_reason(server, files, status, reason) -> None:
    files = [(name, _bomb() if data is None else data) for name, data in files]
    got, reply = _post_files(server, files)
    assert got == status
    assert reply["predictions"][0]["error"] == reason


def test_a_truncated_png_is_400_truncated_and_the_good_file_beside_it_is_answered(
    server, pngs
) -> None:
    whole = pngs[0].read_bytes()
    status, reply = _post_files(server, [("cut.png", whole[: len(whole) // 2]), ("ok.png", whole)])
    assert status == 400
    cut, ok = reply["predictions"]
    assert cut["error"] in ("truncated", "decode_error") and cut["detail"]
    assert ok["top_k"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (b"", {"Content-Type": "application/json"}, 400, "empty_body"),
        (b"abc", {"Content-Type": "text/plain"}, 415, "unsupported_content_type"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "bad_json"),
        (b'{"files": [{"data": "%%%"}]}', {"Content-Type": "application/json"}, 400, "bad_json"),
        (b"x" * (2**20 + 1), {"Content-Type": "application/json"}, 413, "too_large"),
    ],
)
def test_a_bad_request_gets_a_clear_status(server, body, headers, status, error) -> None:
    got, reply = _request(server, "POST", "/predict", body, headers)
    assert (got, reply["error"]) == (status, error)


def test_a_form_without_files_and_an_unknown_path(server, pngs) -> None:
    body, content_type = multipart([("a.png", pngs[0].read_bytes())], field="image")
    status, reply = _request(server, "POST", "/predict", body, {"Content-Type": content_type})
    assert (status, reply["error"]) == (400, "no_files")
    assert _request(server, "GET", "/nothing")[0] == 404


def test_a_concurrent_burst_is_answered_without_errors(server, pngs) -> None:
    files = [(p.name, p.read_bytes()) for p in pngs[:2]]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _post_files(server, files), range(64)))
    assert all(status == 200 for status, _ in results)
    assert len({json.dumps(reply["predictions"]) for _, reply in results}) == 1


@pytest.mark.slow
def test_the_command_serves_and_survives_thousands_of_bad_uploads(int8, pngs) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve-model", "--model", str(int8), "--port", "0",
         "--max-mb", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stderr.readline()
        assert "serving" in line, line
        host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()

        class Remote:
            server_address = (host, int(port))

        good = [(pngs[0].name, pngs[0].read_bytes())]
        whole = pngs[0].read_bytes()
        bad = [
            lambda: _post_files(Remote, [("x.png", b"not an image")]),
            lambda: _post_files(Remote, [("cut.png", whole[:40])]),
            lambda: _request(Remote, "POST", "/predict", b"", {"Content-Type": "image/png"}),
            lambda: _request(
                Remote, "POST", "/predict", b"{", {"Content-Type": "application/json"}
            ),
        ]
        assert _post_files(Remote, good)[0] == 200
        before = rss_kb(process.pid)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: bad[i % len(bad)]()[0], range(2000)))
        assert set(statuses) <= {400, 415} and 500 not in statuses
        after = rss_kb(process.pid)
        assert after - before < 50_000, f"RSS grew {after - before} kB over 2000 bad uploads"
        assert _post_files(Remote, good)[0] == 200  # still up, still right
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_moving_the_champion_alias_is_served_without_a_restart(tmp_path, params, pngs) -> None:
    import mlflow

    from tasks.serving import registry

    quantize = params.quantize.model_copy(update={"calibration_size": 64})
    _, fp32, int8 = export_corner_variants(tmp_path, quantize)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        experiment = mlflow.create_experiment(
            "serve", artifact_location=(tmp_path / "runs").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            first = registry.register_variants({"student_int8": int8}, {}, {})["student_int8"]
        registry.set_champion(first.version)
        slot = ModelSlot(registry.champion_uri(), threads=1, refresh_s=0, log=lambda line: None)
        running = ModelServer(("127.0.0.1", 0), slot)
        threading.Thread(target=running.serve_forever, daemon=True).start()
        try:
            files = [(pngs[0].name, pngs[0].read_bytes())]
            status, reply = _post_files(running, files)
            assert status == 200
            served = {"name": "visionpipe-student_int8", "version": first.version,
                      "alias": "champion", "source": registry.champion_uri()}  # fmt: skip
            assert reply["model"] == served
            with mlflow.start_run(experiment_id=experiment):  # another file: a new version
                second = registry.register_variants({"student_int8": fp32}, {}, {})
            registry.set_champion(second["student_int8"].version)
            status, reply = _post_files(running, files)
            assert status == 200 and reply["model"]["version"] == second["student_int8"].version
            assert reply["predictions"][0]["top_k"]
        finally:
            running.shutdown()
            running.server_close()
            mlflow.set_tracking_uri(None)
