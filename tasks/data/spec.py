"""How prepare stores images: channels and size, read off the images when params say ``auto``.

``image_spec`` turns ``data.channels``/``data.image_size``/``data.resize`` into
the ``ImageSpec`` every image is decoded to. With ``auto``, channels come from
every file's header (colour if any file is colour) and the size from a
sample's median short side, rounded and kept within ``AUTO_SIZE_BOUNDS`` so
students stay small and fast. Only headers are read (``item_shapes``), not
pixels. Used by the prepare stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.data.images import ArrayItems, ImageSpec, open_regular
from tasks.data.sources import Source
from tasks.params import DataParams

AUTO_SIZE_BOUNDS = (16, 32)  # data.image_size: auto stays here: students stay small and fast


AUTO_SIZE_STEP = 4


AUTO_SAMPLE = 2000  # files whose headers set data.image_size: auto (all are read for channels)


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class ImageShape:
    """What an item's header says: its size and whether it holds colour."""

    width: int
    height: int
    grayscale: bool


def _header(path: str, max_bytes: int | None = None) -> ImageShape | None:
    """Size and colour from the file's header (no pixel decoding); None if unreadable
    or not a regular file (``open_regular``: a FIFO is never opened for a blocking read).

    A palette image counts as grayscale when every palette entry is grey.
    """
    try:
        with open_regular(path, max_bytes) as file, Image.open(file) as image:
            gray = image.mode in GRAYSCALE_MODES
            if image.mode in ("P", "PA"):
                palette = np.asarray(image.getpalette() or [], dtype=np.int16).reshape(-1, 3)
                gray = bool((palette == palette[:, :1]).all())
            return ImageShape(image.width, image.height, gray)
    except Exception:  # broken files are prepare's to quarantine, with their reason
        return None


def item_shapes(source: Source, seed: int, sample: int | None = None) -> list[ImageShape]:
    """Headers of the source's items (of a seeded sample of ``sample`` of them, if given)."""
    items = source.items
    if isinstance(items, ArrayItems):
        height, width = items.pixels.shape[1:3]
        gray = items.pixels.ndim == 3 or items.pixels.shape[3] == 1
        return [ImageShape(width, height, gray)]  # one array, one shape
    paths = np.asarray(items.paths)
    if sample is not None and len(paths) > sample:
        paths = np.random.default_rng(seed).choice(paths, sample, replace=False)
    shapes = (_header(path, items.max_bytes) for path in paths)
    return [shape for shape in shapes if shape is not None]


def auto_size(shapes: list[ImageShape]) -> int:
    """The median shorter side, rounded to a multiple of AUTO_SIZE_STEP, within AUTO_SIZE_BOUNDS."""
    low, high = AUTO_SIZE_BOUNDS
    if not shapes:
        return low
    median = float(np.median([min(s.width, s.height) for s in shapes]))
    return int(min(max(AUTO_SIZE_STEP * round(median / AUTO_SIZE_STEP), low), high))


def image_spec(params: DataParams, source: Source | None = None, seed: int = 0) -> ImageSpec:
    """The stored format; ``data.channels`` / ``data.image_size`` ``auto`` are read off
    ``source``: 1 channel when every readable item is grayscale, else 3; the size from
    the median shorter side (``auto_size``)."""
    channels, size = params.channels, params.image_size
    if "auto" in (channels, size) and source is None:
        raise ValueError("data.channels / data.image_size auto need the source to look at")
    if channels == "auto":
        channels = 1 if all(s.grayscale for s in item_shapes(source, seed)) else 3
    if size == "auto":
        size = auto_size(item_shapes(source, seed, AUTO_SAMPLE))
    return ImageSpec(
        size=int(size),
        channels=int(channels),
        resize=params.resize,
        background=params.background,
        min_size=params.min_size,
    )
