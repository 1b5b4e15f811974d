"""Where images come from: the built-in digits, Fashion-MNIST IDX files, or an ImageFolder.

A source lists labelled items without decoding them: ``items`` reads one item
at a time (an array row or a file), so the prepare stage decodes them in worker
processes instead of holding a folder of photos in memory. ``build_source``
picks the loader from ``data.source``; ``cap_per_class`` applies
``data.max_per_class`` before anything is decoded.

An ImageFolder is one sub-folder per class, nested folders allowed; hidden
files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped, and files
without an image suffix are counted in ``ignored`` (never silently dropped).

Listing a folder cannot hang or recurse without end: a folder already being
listed (a symlink loop such as ``cat/loop -> ..``) or already listed is not
entered again; symlinks that leave the source root are skipped unless
``data.symlinks: follow`` (``skip``: no symlink is followed); every symlink
followed or skipped is counted. Entries that are not regular files (FIFOs,
sockets, devices) stay items, so prepare quarantines them as ``not_a_file``
without reading a byte (``tasks.data.images.open_regular``).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tasks.data.images import ArrayItems, FileItems, Items
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
# What Pillow reads; anything else in a class folder is counted as ignored.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
)  # fmt: skip


@dataclass(frozen=True)
class Source:
    """Labelled items, listed but not yet decoded.

    ``official_test`` marks items of a published test split (Fashion-MNIST's
    10k); the prepare stage keeps it as the test split instead of drawing one.
    ``ignored`` counts files that were never items (no image suffix, hidden).
    """

    name: str
    classes: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    items: Items
    # Arrays, not lists: Prefect walks list arguments of a task element by element.
    item_names: np.ndarray  # str objects (N,): a path, or "digits[17]"
    official_test: np.ndarray | None = None
    ignored: dict[str, int] = field(default_factory=dict)
    symlinks: dict[str, int] = field(default_factory=dict)  # followed: inside / outside the root

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> Source:
        """The items at ``positions``, in that order."""
        return replace(
            self,
            labels=self.labels[positions],
            items=self.items.take(positions),
            item_names=self.item_names[positions],
            official_test=None if self.official_test is None else self.official_test[positions],
        )


def cap_per_class(source: Source, max_per_class: int | None, seed: int) -> Source:
    """At most ``max_per_class`` items of each class, drawn at random (seeded), order kept.

    Where the source has an official test split, each class's cap is shared
    between its official train and test items in their original proportion,
    so that every class still has test images.
    """
    if max_per_class is None:
        return source
    rng = np.random.default_rng(seed)
    official = (
        np.zeros(len(source), dtype=bool) if source.official_test is None else source.official_test
    )
    keep = []
    for c in range(len(source.classes)):
        members = np.flatnonzero(source.labels == c)
        if len(members) <= max_per_class:
            keep.append(members)
            continue
        test, train = members[official[members]], members[~official[members]]
        test_cap = min(len(test), max(round(max_per_class * len(test) / len(members)), 1))
        for part, cap in ((train, max_per_class - test_cap), (test, test_cap)):
            keep.append(rng.choice(part, size=min(cap, len(part)), replace=False))
    return source.take(np.sort(np.concatenate(keep)))


def _names(source: str, count: int) -> np.ndarray:
    return np.asarray([f"{source}[{i}]" for i in range(count)], dtype=object)


def _digits(params: DataParams) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 intensities 0..16 -> the uint8 range every other source uses.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        name="digits",
        classes=tuple(str(name) for name in bunch.target_names),
        labels=bunch.target.astype(np.int64),
        items=ArrayItems(pixels),
        item_names=_names("digits", len(pixels)),
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
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    official_test = np.zeros(len(labels), dtype=bool)
    official_test[len(arrays["train_labels"]) :] = True
    return Source(
        name="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        labels=labels,
        items=ArrayItems(images),
        item_names=_names("fashion-mnist", len(labels)),
        official_test=official_test,
    )


@dataclass
class _Listing:
    """One walk over an ImageFolder: what it found, set aside and followed."""

    root: str  # the root's real path
    symlinks: str  # data.symlinks: inside | follow | skip
    ignored: Counter[str] = field(default_factory=Counter)
    followed: Counter[str] = field(default_factory=Counter)
    listed: set[tuple[int, int]] = field(default_factory=set)  # (device, inode) of folders
    classes: set[tuple[int, int]] = field(default_factory=set)  # the class folders

    def inside(self, path: str) -> bool:
        return os.path.commonpath([self.root, os.path.realpath(path)]) == self.root

    def follows(self, entry: os.DirEntry) -> bool:
        """Whether to use a symlink ``entry``; counts the choice either way."""
        if self.symlinks == "skip":
            self.ignored["symlink_skipped"] += 1
            return False
        where = "inside_root" if self.inside(entry.path) else "outside_root"
        if where == "outside_root" and self.symlinks == "inside":
            self.ignored["symlink_outside_root"] += 1
            return False
        self.followed[where] += 1
        return True

    def walk(self, directory: str, ancestors: frozenset[tuple[int, int]]) -> list[str]:
        """Image files under ``directory`` (a class folder, or one below it), sorted.

        ``ancestors`` are the folders being listed above it, the root first. A
        folder reached again through a symlink is not listed again: a loop when it
        is one of them (``cat/loop -> ..``), else a repeat (another class's folder,
        or one already listed).
        """
        key = _identity(directory)
        if key in ancestors:
            self.ignored["symlink_loop"] += 1
            return []
        if key in self.listed or (len(ancestors) > 1 and key in self.classes):
            self.ignored["folder_listed_twice"] += 1
            return []
        self.listed.add(key)
        found: list[str] = []
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    self.ignored["hidden"] += 1
                elif entry.is_symlink() and not self.follows(entry):
                    continue
                elif _is_dir(entry):
                    found.extend(self.walk(entry.path, ancestors | {key}))
                elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(entry.path)  # a FIFO too: open_regular quarantines it unread
                else:
                    self.ignored["not_an_image_suffix"] += 1
        return sorted(found)


def _identity(directory: str) -> tuple[int, int]:
    info = os.stat(directory)
    return info.st_dev, info.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink; a dangling one is no folder
    except OSError:  # ELOOP: a symlink to itself
        return False


def _image_folder(params: DataParams) -> Source:
    root = Path(params.source)
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: {root} does not exist or is not a directory")
    listing = _Listing(os.path.realpath(root), params.symlinks)
    ignored = listing.ignored
    class_dirs = []
    linked_out = []  # class folders that are symlinks data.symlinks does not follow
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            ignored["hidden"] += 1
        elif entry.is_symlink() and not listing.follows(entry):
            if _is_dir(entry):
                linked_out.append(f"{entry.name} -> {os.path.realpath(entry.path)}")
        elif _is_dir(entry):
            class_dirs.append(entry)
        else:
            ignored["outside_a_class_folder"] += 1
    if linked_out:  # a whole class left out without a word would be worse than stopping
        raise ValueError(
            f"data.source: class folder(s) {', '.join(linked_out)} in {root} are symlinks "
            f"that data.symlinks={params.symlinks!r} does not follow: set data.symlinks: "
            "follow, or copy the folders in"
        )
    if not class_dirs:
        raise ValueError(
            f"data.source: {root} holds no class sub-folders: an ImageFolder has one "
            "sub-folder per class (root/cat/*.jpg, root/dog/*.jpg, ...)"
        )
    if len(class_dirs) < 2:
        raise ValueError(
            f"data.source: {root} holds one class ({class_dirs[0].name}); "
            "a classifier needs at least 2 class sub-folders"
        )
    top = frozenset({_identity(str(root))})
    listing.classes = {_identity(d.path) for d in class_dirs}
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, class_dir in enumerate(class_dirs):
        found = listing.walk(class_dir.path, top)
        if not found:
            empty.append(class_dir.name)
        paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(
            f"data.source: class folder(s) {', '.join(empty)} in {root} hold no image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder"
        )
    return Source(
        name=str(root),
        classes=tuple(d.name for d in class_dirs),
        labels=np.asarray(labels, dtype=np.int64),
        items=FileItems(np.asarray(paths, dtype=object), int(params.max_file_mb * 2**20)),
        item_names=np.asarray(paths, dtype=object),
        ignored=dict(sorted(ignored.items())),
        symlinks=dict(sorted(listing.followed.items())),
    )


SOURCES: dict[str, Callable[[DataParams], Source]] = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
}


def build_source(params: DataParams) -> Source:
    """The source ``data.source`` names: a built-in one, else a path to an ImageFolder."""
    if params.source in SOURCES:
        return SOURCES[params.source](params)
    return _image_folder(params)
