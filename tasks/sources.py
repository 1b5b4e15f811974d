"""Where images come from: the built-in digits, Fashion-MNIST IDX files, or an ImageFolder.

A source is an indexable collection of labelled items. ``load(i)`` decodes item
``i`` into a Pillow image, so that the prepare stage converts one image at a
time instead of holding a whole folder of photos in memory. ``build_source``
picks the loader from ``data.source``.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.params import DataParams

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class Source:
    """Labelled items that decode one at a time.

    ``official_test`` marks items of a published test split (Fashion-MNIST's
    10k); the prepare stage keeps it as the test split instead of drawing one.
    """

    name: str
    classes: tuple[str, ...]
    labels: np.ndarray
    load: Callable[[int], Image.Image]
    item_names: Sequence[str]
    official_test: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _digits(params: DataParams) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 intensities 0..16 -> the uint8 range every other source uses.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        name="digits",
        classes=tuple(str(name) for name in bunch.target_names),
        labels=bunch.target.astype(np.int64),
        load=lambda i: Image.fromarray(pixels[i]),
        item_names=[f"digits[{i}]" for i in range(len(pixels))],
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: header cut short ({ndim} dimensions promised)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header promises {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory} (data.fashion_mnist_dir). "
        "Install Debian's package with `apt-get install dataset-fashion-mnist` (as root), "
        "or point data.fashion_mnist_dir at a folder holding the four IDX files."
    )


def _fashion_mnist(params: DataParams) -> Source:
    directory = Path(params.fashion_mnist_dir)
    arrays = {
        key: read_idx(_find_idx(directory, stem)) for key, stem in FASHION_MNIST_FILES.items()
    }
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    official_test = np.zeros(len(labels), dtype=bool)
    official_test[len(arrays["train_labels"]) :] = True
    return Source(
        name="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        labels=labels,
        load=lambda i: Image.fromarray(images[i]),
        item_names=[f"fashion-mnist[{i}]" for i in range(len(labels))],
        official_test=official_test,
    )


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_folder(params: DataParams) -> Source:
    root = Path(params.source)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"data.source {root} holds no class sub-folders (one per class)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and _visible(path, root):
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(
            f"data.source {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    def load(i: int) -> Image.Image:
        with Image.open(paths[i]) as image:
            image.load()
            return image.copy()

    return Source(
        name=str(root),
        classes=tuple(d.name for d in class_dirs),
        labels=np.asarray(labels, dtype=np.int64),
        load=load,
        item_names=[str(p) for p in paths],
    )


SOURCES: dict[str, Callable[[DataParams], Source]] = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
}


def build_source(params: DataParams) -> Source:
    """The source ``data.source`` names: a built-in one, else a path to an ImageFolder."""
    if params.source in SOURCES:
        return SOURCES[params.source](params)
    if Path(params.source).is_dir():
        return _image_folder(params)
    raise ValueError(
        f"data.source: {params.source!r} is neither one of {', '.join(SOURCES)} "
        "nor an existing ImageFolder directory"
    )
