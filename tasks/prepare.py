"""Prepare stage: decode, validate, convert channels, resize, split, and take train statistics.

Run with ``dvc repro prepare`` (or ``python -m flows.prepare``). Reads the
``seed`` and ``data`` sections; writes ``data/prepared/`` (format in
``tasks/datasets.py``), ``metrics/prepare.json`` and ``reports/data_quality.json``.
A file that fails to decode is quarantined (listed there with its reason)
rather than stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split

from tasks.artifacts import atomic_dir, write_json
from tasks.datasets import SPLITS, ChannelStats, Split, write_prepared
from tasks.orchestration import stage_task
from tasks.params import DataParams
from tasks.sources import Source, build_source

# What Pillow raises on a file it cannot decode: truncated data, a non-image
# with an image suffix, a decompression bomb, an unsupported mode.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Converted:
    """Every decodable item of a source in the stored format, plus what was set aside."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    official_test: np.ndarray | None
    quarantined: list[dict[str, str]] = field(default_factory=list)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer and float images to 8 bits (Pillow's convert would clip)."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else 255.0  # [0, 1] floats or 8-bit range
    else:  # "I" and "I;16*": 16-bit data unless every value already fits in 8 bits
        top = 65535.0 if pixels.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8))


def to_array(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """One Pillow image -> uint8 (size, size, channels): orientation, depth, alpha, mode, size."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F" or image.mode.startswith("I"):
        image = _to_8bit(image)
    # RGBA/LA/PA carry alpha; P, L and RGB may carry a colour key ("transparency").
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels have no colour of their own: show them on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


@stage_task(name="load-source")
def load_source(params: DataParams) -> Source:
    return build_source(params)


@stage_task(name="convert")
def convert(source: Source, params: DataParams) -> Converted:
    """Decode and convert every item; quarantine what does not decode."""
    images = np.empty(
        (len(source), params.image_size, params.image_size, params.channels), np.uint8
    )
    kept = np.zeros(len(source), dtype=bool)
    quarantined: list[dict[str, str]] = []
    for i in range(len(source)):
        try:
            images[i] = to_array(source.load(i), params.channels, params.image_size)
            kept[i] = True
        except DECODE_ERRORS as exc:
            quarantined.append(
                {"path": source.item_names[i], "reason": f"{type(exc).__name__}: {exc}"}
            )
    if not kept.any():
        raise ValueError(f"no image of {source.name} could be decoded")
    official = source.official_test[kept] if source.official_test is not None else None
    return Converted(images[kept], source.labels[kept], official, quarantined)


def stratified_split(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    official_test: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices of train/val/test, each stratified by label.

    Where the source publishes a test split it is kept as is, and validation is
    carved from the rest; otherwise test takes ``test_fraction`` of all items and
    val takes ``val_fraction`` of all items.
    """
    everything = np.arange(len(labels))
    try:
        if official_test is not None:
            test, rest = everything[official_test], everything[~official_test]
            val_share = val_fraction
        else:
            rest, test = train_test_split(
                everything, test_size=test_fraction, stratify=labels, random_state=seed
            )
            val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:
        counts = np.bincount(labels)
        raise ValueError(
            f"cannot split stratified by class (data.val_fraction={val_fraction}, "
            f"data.test_fraction={test_fraction}; smallest class has {counts.min()} images): {exc}"
        ) from None
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    for name, indices in splits.items():
        missing = np.setdiff1d(np.unique(labels), labels[indices])
        if missing.size:
            counts = np.bincount(labels)
            raise ValueError(
                f"class(es) {missing.tolist()} (with {counts[missing].tolist()} images) would have "
                f"no image in the {name} split (data.val_fraction={val_fraction}, "
                f"data.test_fraction={test_fraction}): add images to them or remove them"
            )
    return splits


@stage_task(name="split")
def split(converted: Converted, params: DataParams, seed: int) -> dict[str, Split]:
    indices = stratified_split(
        converted.labels, params.val_fraction, params.test_fraction, seed, converted.official_test
    )
    return {
        name: Split(converted.images[idx], converted.labels[idx]) for name, idx in indices.items()
    }


@stage_task(name="channel-stats")
def channel_stats(train: Split) -> ChannelStats:
    """Normalisation statistics from the train split only, so val/test stay unseen."""
    return ChannelStats.of(train.images)


@stage_task(name="write-prepared")
def write(
    out_dir: Path,
    metrics_path: Path,
    quality_path: Path,
    splits: dict[str, Split],
    source: Source,
    converted: Converted,
    stats: ChannelStats,
) -> dict:
    """Swap the new prepared data in whole; record sizes (metrics) and what was set aside."""
    with atomic_dir(out_dir) as tmp:
        write_prepared(tmp, splits, source.classes, stats)
    num_classes = len(source.classes)
    write_json(
        quality_path,
        {
            "source": source.name,
            "quarantined": converted.quarantined,
            "class_counts": {
                name: dict(zip(source.classes, splits[name].class_counts(num_classes), strict=True))
                for name in SPLITS
            },
        },
    )
    metrics = {
        "images": len(converted.labels),
        "quarantined": len(converted.quarantined),
        "num_classes": num_classes,
        **{f"{name}_size": len(splits[name]) for name in SPLITS},
    }
    write_json(metrics_path, metrics)
    return metrics
