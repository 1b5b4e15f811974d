"""The model server under load: throughput, latency percentiles, errors and memory over loopback.

    python benchmarks/serve_load.py [--model student_int8] [--requests 400] [--bad-share 0.1]
                                    [--server serve-model|mlflow] [--repo PATH] [--smoke]

Starts the real ``visionpipe serve-model`` as its own process (or, with
``--server mlflow``, ``mlflow models serve`` on the same model saved as the
registry logs it, requests as JSON ``dataframe_split`` with base64), then at
concurrency 1, 4 and 16 sends ``--requests`` POST /predict requests, each one
real test-split image (``data/prepared``, encoded as PNG) with a fixed share
of bad uploads among them (not an image, truncated PNG, empty body, wrong
content type, in turn). It records requests/s, p50/p95/p99 latency of the
good requests, the error rate of good requests (should be 0) and that every
bad one got a 4xx, and the server's peak RSS. In the same run it times the
same images through ONNX Runtime directly (decode and predict in this process,
one image per call), so the cost of the HTTP layer is a ratio measured side by
side. Needs ``dvc repro`` first (the model and the test split). Writes
``benchmarks/results/serve_load_<model>.json`` (``serve_load_mlflow_<model>.json``).
MLflow's server answers a row that is not an image with 200 and the row's
error, so its bad requests are counted by status, not expected to be 4xx.
``--smoke`` sends 20 requests a level over 20 images (``*_smoke.json``): does
the script run?
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from tasks.data.datasets import load_prepared  # noqa: E402
from tasks.inference import decode_blobs, predict_decoded  # noqa: E402
from tasks.layout import PREPARED_DIR  # noqa: E402
from tasks.servers import free_port, healthy  # noqa: E402
from tasks.serving.predict import VARIANTS, load_model  # noqa: E402

CONCURRENCY = (1, 4, 16)
# (file name, bytes) pairs -> a request body and its content type
Encoder = Callable[[list[tuple[str, bytes]]], tuple[bytes, str]]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(out, "PNG")
    return out.getvalue()


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` (name, bytes) under ``field``, and its type."""
    boundary = uuid.uuid4().hex
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _bad_requests(good: bytes, encode: Encoder) -> list[tuple[bytes, str]]:
    """Not an image, a truncated PNG (both in the server's own format), no body, a raw PNG."""
    return [
        encode([("notes.png", b"not an image at all")]),
        encode([("cut.png", good[: len(good) // 2])]),
        (b"", "application/json"),
        (good, "image/png"),
    ]


def dataframe(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """An ``mlflow models serve`` body: the files as ``dataframe_split`` rows, base64."""
    rows = [[base64.b64encode(data).decode(), name] for name, data in files]
    body = {"dataframe_split": {"columns": ["image", "name"], "data": rows}}
    return json.dumps(body).encode(), "application/json"


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in kB (0 once it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss // 1024
    except psutil.Error:
        return 0


def tree_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its children (``mlflow models serve`` runs uvicorn)."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) // 1024
    except psutil.Error:
        return 0


class _Peak(threading.Thread):
    """Samples the server's RSS every 20 ms while the load runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, tree_rss_kb(self.pid))


def _load(
    host: str, port: int, path: str, requests: list[tuple[bytes, str, bool]], workers: int
) -> dict:
    local = threading.local()

    def send(request: tuple[bytes, str, bool]) -> tuple[bool, int, float]:
        body, content_type, good = request
        if getattr(local, "connection", None) is None:
            local.connection = http.client.HTTPConnection(host, port, timeout=60)
            local.connection.connect()
            # http.client sends headers and body in two writes: without this, Nagle and
            # the server's delayed ACK hold every body back ~40 ms.
            local.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        try:
            local.connection.request("POST", path, body, {"Content-Type": content_type})
            response = local.connection.getresponse()
            response.read()
            status = response.status
            if response.getheader("Connection") == "close":
                local.connection.close()
                local.connection = None
        except (OSError, http.client.HTTPException):
            local.connection, status = None, 0
        return good, status, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(send, requests))
    seconds = time.perf_counter() - started
    good = [(status, t) for is_good, status, t in results if is_good]
    bad = [status for is_good, status, _ in results if not is_good]
    latencies = sorted(t * 1000 for status, t in good if status == 200)

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies else float("nan")

    return {
        "concurrency": workers,
        "requests": len(results),
        "requests_per_second": len(results) / seconds,
        "good_requests": len(good),
        "good_error_rate": sum(status != 200 for status, _ in good) / max(len(good), 1),
        "bad_requests": len(bad),
        "bad_statuses": {str(s): bad.count(s) for s in sorted(set(bad))},
        "bad_answered_4xx": all(400 <= s < 500 for s in bad),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
    }  # fmt: skip


def _direct(model_ref: str, images: list[bytes], repeats: int = 3) -> dict:
    """The same PNGs decoded and predicted in this process, one per call: no HTTP."""
    model = load_model(model_ref)
    times = []
    for _ in range(repeats):
        for i, data in enumerate(images):
            started = time.perf_counter()
            predict_decoded(model, [f"{i}.png"], decode_blobs([data], model.spec))
            times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": statistics.median(times), "images_per_second": 1000 / statistics.mean(times)}


def _serve_model(model: str, scratch: Path) -> tuple[subprocess.Popen, str, int, str]:
    """``visionpipe serve-model`` on an OS-chosen port; the process, host, port, path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve-model", "--model", model, "--port", "0"],
        cwd=Path.cwd(), env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = server.stderr.readline()
    found = re.search(r"http://([\d.]+):(\d+)", line)
    if found is None:
        server.kill()
        raise SystemExit(f"serve-model did not start: {line}{server.stderr.read()}")
    return server, found.group(1), int(found.group(2)), "/predict"


def _serve_mlflow(model: str, scratch: Path) -> tuple[subprocess.Popen, str, int, str]:
    """``mlflow models serve`` on the model folder the registry would log for ``model``."""
    from tasks.serving.registry import save_image_model

    onnx_path = VARIANTS.get(model, Path(model))
    if onnx_path.suffix != ".onnx":
        raise SystemExit(f"--server mlflow needs an ONNX model, not {onnx_path}")
    folder = save_image_model(scratch / "model", onnx_path)
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        if healthy(f"http://127.0.0.1:{port}"):
            return server, "127.0.0.1", port, "/invocations"
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"mlflow models serve did not start: {server.stderr.read()[-2000:]}")


SERVERS = {"serve-model": (_serve_model, multipart), "mlflow": (_serve_mlflow, dataframe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="student_int8")
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--server", choices=sorted(SERVERS), default="serve-model")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="a checkout where `dvc repro` has run"
    )
    parser.add_argument("--smoke", action="store_true", help="20 requests a level, 20 images")
    args = parser.parse_args()
    if args.smoke:
        args.requests = 20
    os.chdir(args.repo)  # the model and the test split, where that checkout keeps them
    start, encode = SERVERS[args.server]

    test = load_prepared(PREPARED_DIR).test
    images = [_png(pixels) for pixels in test.images[: 20 if args.smoke else 200]]
    every = max(1, round(1 / args.bad_share)) if args.bad_share > 0 else 0
    bad = _bad_requests(images[0], encode)
    requests = []
    for i in range(args.requests):
        if every and i % every == every - 1:
            body, content_type = bad[(i // every) % len(bad)]
            requests.append((body, content_type, False))
        else:
            requests.append((*encode([(f"{i}.png", images[i % len(images)])]), True))

    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        server, host, port, path = start(args.model, Path(scratch))
        try:
            idle_kb = tree_rss_kb(server.pid)
            levels = []
            for workers in CONCURRENCY:
                peak = _Peak(server.pid)
                peak.start()
                level = _load(host, port, path, requests, workers)
                peak.done.set()
                peak.join()
                level["server_peak_rss_mb"] = peak.peak / 1024
                levels.append(level)
                print(f"concurrency {workers:2d}: {level['requests_per_second']:.0f} req/s, p50 "
                      f"{level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, good errors "
                      f"{level['good_error_rate']:.3f}, bad {level['bad_statuses']}, "
                      f"peak RSS {level['server_peak_rss_mb']:.0f} MB")  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
    direct = _direct(args.model, images, repeats=1 if args.smoke else 3)
    single = levels[0]
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "server": args.server,
        "model": args.model,
        "requests_per_level": args.requests,
        "bad_share": args.bad_share,
        "server_idle_rss_mb": idle_kb / 1024,
        "levels": levels,
        "direct_onnxruntime": direct,
        # one request at a time over HTTP against one image at a time in-process
        "http_over_direct_p50": single["p50_ms"] / direct["p50_ms"],
    }
    print(f"direct: p50 {direct['p50_ms']:.2f} ms; HTTP at concurrency 1 costs "
          f"{result['http_over_direct_p50']:.2f}x the direct p50")  # fmt: skip
    prefix = "serve_load" if args.server == "serve-model" else "serve_load_mlflow"
    name = result_name(f"{prefix}_{args.model}.json", args.smoke)
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
