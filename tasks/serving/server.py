"""Serve one model over HTTP: image files in, top-k labels out (``visionpipe serve-model``).

    visionpipe serve-model --model models:/visionpipe-student_int8@champion --port 8080
    curl -F files=@cat.png -F files=@dog.jpg http://127.0.0.1:8080/predict

``GET /health`` says which model answers; ``POST /predict`` takes one or many
image files, as ``multipart/form-data`` under the field ``files`` or as JSON
``{"files": [{"name": "cat.png", "data": "<base64>"}]}``, and answers with the
JSON ``visionpipe predict --json`` prints (``predictions``: one ``{"path",
"top_k"}`` or ``{"path", "error", "detail"}`` per file, in order) and the
model's ``name``, ``version`` and ``alias``. Each file is decoded by prepare's
own ``decode_item`` with the preprocessing stored in the model, so a served
image is seen exactly as training saw it.

What a client can get wrong is answered with a status, never a crash:
an empty body or no ``files`` 400, a file that is not an image or is
truncated 400 with prepare's quarantine reason (``not_an_image``,
``truncated``, ...), a body over ``max_bytes`` or an image over
``max_pixels`` (a decompression bomb) 413, any other content type 415. A body
is never read past ``max_bytes``, and at most ``max_inflight`` requests
decode and predict at once (the others wait), so memory stays bounded
whatever is sent.

With an alias URI (``models:/<name>@<alias>``) the server asks MLflow every
``refresh_s`` seconds which version the alias points to and, when it moved,
loads the new version and swaps it in between requests: a request is
answered by the model that was current when it started, and none is dropped.

The server is the standard library's threading HTTP server: one thread per
connection, no extra dependency. Put a reverse proxy in front of it for TLS.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tasks.inference import MAX_PIXELS, Model, ModelError, decode_blobs, predict_decoded
from tasks.serving.predict import VARIANTS, file_md5, load_model

MAX_BYTES = 16 * 2**20  # one request's body
MAX_FILES = 64  # files in one request
MAX_INFLIGHT = 4  # requests decoding and predicting at once; the others wait their turn
TOO_LARGE = {"too_large", "decompression_bomb"}  # quarantine reasons answered with 413


class UploadError(Exception):
    """A request the server refuses as a whole, with its HTTP status and a reason."""

    def __init__(self, status: HTTPStatus, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


def parse_uploads(content_type: str, body: bytes, max_files: int = MAX_FILES) -> list[Upload]:
    """The files of a ``/predict`` body: multipart ``files`` fields, or JSON base64."""
    if not body:
        raise UploadError(HTTPStatus.BAD_REQUEST, "empty_body", "the request has no body")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        uploads = _multipart(content_type, body)
    elif kind == "application/json":
        uploads = _json(body)
    else:
        raise UploadError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            f"{kind or 'no content type'}: send multipart/form-data (files) or application/json",
        )
    if not uploads:
        raise UploadError(HTTPStatus.BAD_REQUEST, "no_files", "no file under the field 'files'")
    if len(uploads) > max_files:
        raise UploadError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_many_files",
            f"{len(uploads)} files; at most {max_files} per request",
        )  # fmt: skip
    return uploads


def _multipart(content_type: str, body: bytes) -> list[Upload]:
    if "boundary=" not in content_type:
        raise UploadError(HTTPStatus.BAD_REQUEST, "bad_multipart", "no boundary in Content-Type")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise UploadError(HTTPStatus.BAD_REQUEST, "bad_multipart", "the body has no parts")
    uploads = []
    for i, part in enumerate(message.iter_parts()):
        if part.get_param("name", header="content-disposition") != "files":
            continue
        data = part.get_payload(decode=True) or b""
        uploads.append(Upload(part.get_filename() or f"files[{i}]", data))
    return uploads


def _json(body: bytes) -> list[Upload]:
    try:
        document = json.loads(body)
        files = document["files"]
        return [
            Upload(str(f.get("name") or f"files[{i}]"), base64.b64decode(f["data"], validate=True))
            for i, f in enumerate(files)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise UploadError(
            HTTPStatus.BAD_REQUEST, "bad_json",
            f'expected {{"files": [{{"name": ..., "data": "<base64>"}}]}} ({type(exc).__name__})',
        ) from None  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """Which model answers: shown in every response."""

    name: str
    version: str
    alias: str | None
    source: str  # what was asked for


def _mlflow_client():
    import mlflow

    from tasks.tracking_store import tracking_uri

    return mlflow.MlflowClient(tracking_uri=tracking_uri())


def resolve(ref: str) -> tuple[str, Identity]:
    """The exact thing to load for ``ref`` (an alias resolved to its version) and who it is."""
    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref.removeprefix("models:/").split("@", 1)
        try:
            version = _mlflow_client().get_model_version_by_alias(name, alias).version
        except Exception as exc:  # no such model or alias, or no tracking server
            raise ModelError(f"cannot resolve {ref} ({exc})") from exc
        return f"models:/{name}/{version}", Identity(name, str(version), alias, ref)
    if ref.startswith("models:/"):
        name, _, version = ref.removeprefix("models:/").partition("/")
        return ref, Identity(name, version, None, ref)
    path = VARIANTS.get(ref, Path(ref))
    if path.is_file():  # a file's version is its content
        digest = file_md5(path)[:12]
        return ref, Identity(path.name, digest, None, ref)
    return ref, Identity(ref, "", None, ref)


class ModelSlot:
    """The model being served; for an alias, replaced when the alias moves."""

    def __init__(self, ref: str, threads: int, refresh_s: float, log: Callable[[str], None]):
        self.ref, self.threads, self.refresh_s, self.log = ref, threads, refresh_s, log
        target, self.identity = resolve(ref)
        self.model = load_model(target, threads)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> tuple[Model, Identity]:
        """The model to answer this request with (checking the alias when it is time)."""
        if self.identity.alias is not None and time.monotonic() - self._checked >= self.refresh_s:
            self.refresh()
        return self.model, self.identity

    def refresh(self) -> bool:
        """Load the version the alias points to now, if it moved; True when it did."""
        if not self._lock.acquire(blocking=False):
            return False  # another request is checking; this one answers with what is loaded
        try:
            self._checked = time.monotonic()
            try:
                target, identity = resolve(self.ref)
                if identity == self.identity:
                    return False
                model = load_model(target, self.threads)
            except ModelError as exc:  # MLflow away or the new version broken: keep serving
                self.log(f"serve-model: still serving version {self.identity.version}: {exc}")
                return False
            self.model, self.identity = model, identity  # swapped whole, between requests
            self.log(f"serve-model: {self.ref} now version {identity.version}")
            return True
        finally:
            self._lock.release()


def answer(
    slot: ModelSlot, content_type: str, body: bytes, top_k: int, max_pixels: int
) -> tuple[HTTPStatus, dict[str, Any]]:
    """The status and JSON for one ``/predict`` body."""
    model, identity = slot.current()
    head = {"model": asdict(identity)}
    try:
        uploads = parse_uploads(content_type, body)
    except UploadError as refused:
        return refused.status, head | {"error": refused.reason, "detail": refused.detail}
    decoded = decode_blobs([u.data for u in uploads], model.spec, max_pixels)
    predictions = predict_decoded(model, [u.name for u in uploads], decoded, top_k)
    failed = {p.error for p in predictions if not p.ok}
    status = (
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE if failed & TOO_LARGE
        else HTTPStatus.BAD_REQUEST if failed
        else HTTPStatus.OK
    )  # fmt: skip
    return status, head | {"predictions": [p.to_json() for p in predictions]}


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"  # keep-alive: a client can send many requests on one connection
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped
    # Headers and body leave in one write, without Nagle's delay: otherwise a client's
    # delayed ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/health":
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found", "detail": self.path})
            return
        model, identity = self.server.slot.current()
        self._send(HTTPStatus.OK, {"status": "ok", "model": asdict(identity),
                                   "classes": list(model.classes)})  # fmt: skip

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/predict":
            self._refuse(HTTPStatus.NOT_FOUND, "not_found", self.path)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self._refuse(HTTPStatus.BAD_REQUEST, "bad_length", "Content-Length")
            return
        if length > self.server.max_bytes:
            self.close_connection = True  # the rest of the body is never read
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": "too_large", "detail": f"{length} bytes; at most {self.server.max_bytes}",
            })  # fmt: skip
            return
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:  # the client hung up mid-body
            self.close_connection = True
            return
        try:
            with self.server.inflight:
                status, reply = answer(
                    self.server.slot, self.headers.get("Content-Type", ""), body,
                    self.server.top_k, self.server.max_pixels,
                )  # fmt: skip
        except Exception as exc:  # a bug of ours, never the client's: say so, stay up
            self.log_error("predict failed: %r", exc)
            status, reply = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "internal", "detail": f"{type(exc).__name__}: {exc}"},
            )
        self._send(status, reply)

    def _refuse(self, status: HTTPStatus, reason: str, detail: str) -> None:
        self.close_connection = True
        self._send(status, {"error": reason, "detail": detail})

    def _send(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if "model" in document:
            self.send_header("X-Model-Name", document["model"]["name"])
            self.send_header("X-Model-Version", document["model"]["version"])
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            super().log_message(format, *args)


class ModelServer(ThreadingHTTPServer):
    """A threading HTTP server holding the model slot and the request limits."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 drops a burst of new clients

    def __init__(self, address: tuple[str, int], slot: ModelSlot, *, top_k: int = 3,
                 max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 max_inflight: int = MAX_INFLIGHT, access_log: bool = False):  # fmt: skip
        super().__init__(address, _Handler)
        self.slot, self.top_k, self.access_log = slot, top_k, access_log
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.inflight = threading.BoundedSemaphore(max_inflight)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is its own problem, not a server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
