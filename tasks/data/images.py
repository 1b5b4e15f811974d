"""Decode one image into the stored format, or say exactly why it cannot be used.

The prepare stage runs ``decode_chunk`` in worker processes, so this module
imports only Pillow and numpy: a forked worker runs nothing that could wait on
a lock held by the parent's Prefect threads. Every conversion applied to an
image is named (``"RGBA->L"``, ``"alpha_composited"``, ``"resized:pad"``...)
so the data-quality report can count them.

A file is *quarantined*, never fatal, when it is empty, is not an image, is
truncated or otherwise fails to decode, or is smaller than ``data.min_size``;
also when it is not a regular file (a FIFO, socket or device: never read, so
it cannot block), is larger than ``data.max_file_mb``, has vanished since it
was listed, or takes longer than ``data.decode_timeout_s`` to decode.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION = 0x0112  # EXIF tag: how to rotate/flip the stored pixels for display


@dataclass(frozen=True)
class ImageSpec:
    """The stored format (``data.image_size``, ``data.channels``) and how to get there."""

    size: int
    channels: int
    resize: str  # stretch | pad | center_crop
    background: int  # grey level behind transparent pixels and padding
    min_size: int  # shorter side below this: quarantined

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * self.channels

    def preprocessing(self) -> dict[str, int | str]:
        """What inference must repeat to feed a model trained on these images.

        Models carry this (checkpoint field, ONNX metadata ``preprocessing``), so
        ``visionpipe predict`` decodes a new image exactly as prepare did, whatever
        params.yaml says by then.
        """
        return {
            "image_size": self.size,
            "channels": self.channels,
            "resize": self.resize,
            "background": self.background,
        }

    @classmethod
    def from_preprocessing(cls, preprocessing: dict[str, Any]) -> ImageSpec:
        """The spec that decodes one new image the way ``preprocessing`` says (no size floor)."""
        return cls(
            size=int(preprocessing["image_size"]),
            channels=int(preprocessing["channels"]),
            resize=str(preprocessing["resize"]),
            background=int(preprocessing["background"]),
            min_size=1,
        )


class Items(Protocol):
    """Items that a worker can read by position; picklable, so chunks travel to workers."""

    def __len__(self) -> int: ...

    def take(self, positions: np.ndarray) -> Items: ...

    def read(self, i: int) -> bytes:
        """The item's raw content: what duplicates are detected on."""
        ...

    def open(self, raw: bytes) -> Image.Image: ...


@dataclass(frozen=True)
class ArrayItems:
    """Items that are rows of a uint8 array (digits, Fashion-MNIST)."""

    pixels: np.ndarray  # (N, H, W) or (N, H, W, C)

    def __len__(self) -> int:
        return len(self.pixels)

    def take(self, positions: np.ndarray) -> ArrayItems:
        return ArrayItems(self.pixels[positions])

    def read(self, i: int) -> bytes:
        return self.pixels[i].tobytes()

    def open(self, raw: bytes) -> Image.Image:
        return Image.fromarray(np.frombuffer(raw, np.uint8).reshape(self.pixels.shape[1:]))


class Quarantined(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)  # fmt: skip


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular(path: str, max_bytes: int | None = None) -> io.BufferedReader:
    """``path`` opened for reading, if it is a regular file of at most ``max_bytes``.

    Anything else raises ``Quarantined`` without a byte read: a FIFO would block
    the reader forever, a device (``/dev/zero``) would never end. The file is
    opened non-blocking and checked with ``fstat`` on the open descriptor, so a
    file swapped for a FIFO after the check cannot block either.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a socket cannot even be opened: say what it is
            raise Quarantined("not_a_file", f"{_kind(mode)}, not a regular file: not read")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise Quarantined(
                "broken_symlink", f"points to {os.readlink(path)}, which does not exist"
            ) from None
        raise Quarantined("vanished", "listed, then gone before it was read") from None
    except PermissionError as exc:
        raise Quarantined("unreadable", f"{type(exc).__name__}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Quarantined("not_a_file", f"{_kind(info.st_mode)}, not a regular file: not read")
        if max_bytes is not None and info.st_size > max_bytes:
            raise Quarantined(
                "too_large",
                f"{info.st_size} bytes is above data.max_file_mb={max_bytes / 2**20:g}: not read",
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class FileItems:
    """Items that are image files (regular files only; ``open_regular`` checks)."""

    paths: np.ndarray  # str objects: an array, so Prefect does not walk 100k entries
    max_bytes: int | None = None  # a larger file is quarantined unread

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, positions: np.ndarray) -> FileItems:
        return FileItems(self.paths[positions], self.max_bytes)

    def read(self, i: int) -> bytes:
        with open_regular(str(self.paths[i]), self.max_bytes) as file:
            raw = file.read() if self.max_bytes is None else file.read(self.max_bytes + 1)
        if self.max_bytes is not None and len(raw) > self.max_bytes:  # grew since the check
            raise Quarantined("too_large", f"above data.max_file_mb={self.max_bytes / 2**20:g}")
        return raw

    def open(self, raw: bytes) -> Image.Image:
        return Image.open(io.BytesIO(raw))


@dataclass(frozen=True)
class Outcome:
    """What became of one item: stored (``reason`` None) or quarantined with a reason."""

    reason: str | None = None  # empty_file | unreadable | not_an_image | truncated | ...
    detail: str = ""
    digest: bytes = b""  # of the raw content, for exact-duplicate detection
    format: str = ""  # PNG, JPEG, ... ("array" for array sources)
    conversions: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None


def _to_8bit(image: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer and float images to 8 bits (Pillow's convert would clip)."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else 255.0  # [0, 1] floats or 8-bit range
    else:  # "I" and "I;16*": 16-bit data unless every value already fits in 8 bits
        top = 65535.0 if pixels.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8))


def _resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    target = (spec.size, spec.size)
    if spec.resize == "pad":  # keep the aspect ratio, centre on the background
        fill = spec.background if image.mode == "L" else (spec.background,) * 3
        return ImageOps.pad(image, target, Image.Resampling.BILINEAR, color=fill)
    if spec.resize == "center_crop":  # keep the aspect ratio, cut the longer side
        return ImageOps.fit(image, target, Image.Resampling.BILINEAR)
    return image.resize(target, Image.Resampling.BILINEAR)


def convert_image(image: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, tuple[str, ...]]:
    """One Pillow image -> uint8 (size, size, channels), and the names of what was done."""
    done: list[str] = []
    source_mode = image.mode
    if getattr(image, "n_frames", 1) > 1:
        done.append("first_frame")  # an animated GIF/WebP/TIFF: its first frame
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
        done.append("exif_oriented")
    if image.mode == "F" or image.mode.startswith("I"):
        image = _to_8bit(image)
        done.append("depth_rescaled")
    # RGBA/LA/PA carry alpha; P, L and RGB may carry a colour key ("transparency").
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels have no colour of their own: show them on the background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (spec.background,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba)
        done.append("alpha_composited")
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if source_mode != spec.mode:
        done.append(f"{source_mode}->{spec.mode}")
    if image.size != (spec.size, spec.size):
        image = _resize(image, spec)
        done.append(f"resized:{spec.resize}")
    array = np.asarray(image, dtype=np.uint8)
    return (array[..., None] if spec.channels == 1 else array), tuple(done)


def to_array(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One Pillow image -> uint8 (size, size, channels)."""
    return convert_image(image, spec)[0]


def _classify(exc: Exception) -> Quarantined:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, UnidentifiedImageError):  # its message names a memory address
        return Quarantined("not_an_image", "no Pillow plugin recognises the content")
    if isinstance(exc, Image.DecompressionBombError):
        return Quarantined("too_large", message)
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
        return Quarantined("truncated", message)
    return Quarantined("decode_error", message)


def decode_item(items: Items, i: int, spec: ImageSpec) -> tuple[Outcome, np.ndarray | None]:
    """Read, check and convert item ``i``; a bad item comes back with its reason, never raises."""
    try:
        raw = items.read(i)
    except Quarantined as bad:
        return Outcome(bad.reason, bad.detail), None
    except FileNotFoundError:
        return Outcome("vanished", "listed, then gone before it was read"), None
    except OSError as exc:
        return Outcome("unreadable", f"{type(exc).__name__}: {exc}"), None
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    fmt = ""
    try:
        if not raw:
            raise Quarantined("empty_file", "0 bytes")
        with items.open(raw) as image:
            fmt = image.format or "array"
            if min(image.size) < spec.min_size:
                raise Quarantined(
                    "too_small",
                    f"{image.size[0]}x{image.size[1]} is below data.min_size={spec.min_size}",
                )
            # JPEG can decode at 1/2, 1/4 or 1/8 scale, never below the requested
            # size: for large photos this is most of the decoding time saved.
            image.draft(None, (spec.size, spec.size))
            image.load()
            array, done = convert_image(image, spec)
    except Quarantined as bad:
        return Outcome(bad.reason, bad.detail, digest, fmt), None
    # A malformed file can make a Pillow plugin raise almost anything (struct.error,
    # IndexError, ...): whatever it is, this one file is set aside and the run goes on.
    except Exception as exc:
        bad = _classify(exc)
        return Outcome(bad.reason, bad.detail, digest, fmt), None
    return Outcome(None, "", digest, fmt, done), array


class DecodeTimeout(BaseException):
    """One item's decoding ran past its limit (a BaseException: no ``except Exception`` eats it)."""


def _expired(signum: int, frame: object) -> None:
    raise DecodeTimeout


def decode_chunk(
    items: Items,
    start: int,
    spec: ImageSpec,
    staging: str,
    offset: int,
    timeout_s: float | None = None,
) -> list[Outcome]:
    """Decode ``items`` and write each good one into row ``start + i`` of the staging file.

    Writing in the worker (``os.pwrite`` at the row's offset) keeps the pixels
    out of the parent process and out of any pipe: only the outcomes travel back.
    With ``timeout_s``, in a process's main thread (where signals can be set: the
    prepare stage's worker processes), an item that takes longer is quarantined
    as ``timeout`` and decoding goes on with the next one.
    """
    timed = bool(timeout_s) and hasattr(signal, "setitimer")
    timed = timed and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _expired) if timed else None
    outcomes = []
    fd = os.open(staging, os.O_WRONLY)
    try:
        for i in range(len(items)):
            try:
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    outcome, array = decode_item(items, i, spec)
                finally:
                    if timed:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except DecodeTimeout:
                detail = f"decoding took over data.decode_timeout_s={timeout_s:g} s"
                outcome, array = Outcome("timeout", detail), None
            if array is not None:
                os.pwrite(fd, array.tobytes(), offset + (start + i) * spec.row_bytes)
            outcomes.append(outcome)
    finally:
        os.close(fd)
        if timed:
            signal.signal(signal.SIGALRM, previous)
    return outcomes
