"""ImageFolders with every kind of odd and broken file, for prepare's tests."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

GOOD_PER_CLASS = 10


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def build_messy_folder(root: Path) -> dict[str, dict[str, str]]:
    """Classes a, b, c: GOOD_PER_CLASS plain PNGs each, plus odd files and broken ones.

    Returns what prepare should make of the extras: ``{"converted": {name: kind},
    "quarantined": {name: reason}}`` with names relative to ``root``.
    """
    seed = 0
    for label in "abc":
        for i in range(GOOD_PER_CLASS):
            seed += 1
            save(root / label / f"good{i}.png", Image.fromarray(noise((12, 12, 3), seed)))
    rgb = Image.fromarray(noise((20, 30, 3), 100))
    frames = [Image.fromarray(noise((16, 16, 3), 101 + k)).convert("P") for k in range(2)]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    converted = {
        "a/rgba.png": (
            save(root / "a/rgba.png", Image.fromarray(noise((16, 16, 4), 102), "RGBA")),
            "alpha_composited",
        ),
        "a/animated.gif": (
            save(root / "a/animated.gif", frames[0], save_all=True, append_images=frames[1:]),
            "first_frame",
        ),
        "a/nested/deeper/cmyk.jpg": (
            save(root / "a/nested/deeper/cmyk.jpg", rgb.convert("CMYK"), format="JPEG"),
            "CMYK->RGB",
        ),
        "b/depth16.png": (
            save(
                root / "b/depth16.png",
                Image.fromarray(noise((16, 16), 103).astype(np.uint16) * 257),
            ),
            "depth_rescaled",
        ),
        "b/rotated.jpg": (
            save(root / "b/rotated.jpg", rgb, format="JPEG", exif=exif),
            "exif_oriented",
        ),
        "b/photo.webp": (
            save(root / "b/photo.webp", rgb, format="WEBP", lossless=True),
            "resized:pad",
        ),
        "c/scan.tiff": (save(root / "c/scan.tiff", rgb.convert("L")), "L->RGB"),
        "c/old.bmp": (
            save(root / "c/old.bmp", Image.fromarray(noise((9, 9, 3), 104))),
            "resized:pad",
        ),
    }
    png = encoded(Image.fromarray(noise((64, 64, 3), 105)), "PNG")
    jpeg = encoded(Image.fromarray(noise((64, 64, 3), 106)), "JPEG")
    corrupt = bytearray(png)
    corrupt[200:260] = bytes(60)  # zeroes inside the compressed pixel data
    quarantined = {
        "a/empty.png": (write(root / "a/empty.png", b""), "empty_file"),
        "b/notes.jpg": (
            write(root / "b/notes.jpg", b"meeting notes, not a picture\n"),
            "not_an_image",
        ),
        "c/truncated.png": (write(root / "c/truncated.png", png[: len(png) * 2 // 3]), "truncated"),
        "c/truncated.jpg": (write(root / "c/truncated.jpg", jpeg[: len(jpeg) // 2]), "truncated"),
        "a/corrupt.png": (write(root / "a/corrupt.png", bytes(corrupt)), "decode_error"),
        "b/tiny.png": (
            save(root / "b/tiny.png", Image.fromarray(noise((4, 5, 3), 107))),
            "too_small",
        ),
    }
    # Exact duplicates: one within class c (one copy dropped), one across a and b
    # (the label is unknowable: both quarantined).
    shutil.copy(root / "c/good0.png", root / "c/copy-of-good0.png")
    shutil.copy(root / "b/good1.png", root / "a/mislabelled.png")
    quarantined["a/mislabelled.png"] = (root / "a/mislabelled.png", "conflicting_labels")
    quarantined["b/good1.png"] = (root / "b/good1.png", "conflicting_labels")
    # Ignored, and counted as such: hidden files and folders, other suffixes, loose files.
    write(root / "a/.DS_Store", b"\x00\x00\x00\x01Bud1")
    save(root / ".ipynb_checkpoints/x/hidden.png", Image.new("RGB", (12, 12)))
    save(root / "b/.ipynb_checkpoints/good0-checkpoint.png", Image.new("RGB", (12, 12)))
    write(root / "b/readme.txt", b"labels by hand")
    save(root / "loose.png", Image.new("RGB", (12, 12)))
    return {
        "converted": {name: kind for name, (_, kind) in converted.items()},
        "quarantined": {name: reason for name, (_, reason) in quarantined.items()},
    }
