"""A messy, long-tailed RGB ImageFolder of the kind users really have, generated from a seed.

    python benchmarks/messy_folder.py OUT_DIR [--seed 0] [--largest 200] [--smallest 16]

Ten classes of objects (circle, square, triangle, star, cross, ring, hexagon,
arrow, crescent, heart), one per sub-folder. Every image differs in what real
folders differ in: size (48-200 px) and aspect ratio (0.6-1.7), background
(flat, gradient or noise, any colour), the object's colour, size, position,
rotation and outline-or-filled, clutter (lines and blobs of any colour), and
format (PNG or JPEG at varied quality). Class sizes fall geometrically from
``--largest`` to ``--smallest`` images (long-tailed). The same seed gives the
same bytes, so benchmark results are comparable across runs and machines.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "hexagon", "arrow", "crescent", "heart",
)  # fmt: skip


def _polygon(kind: str) -> list[tuple[float, float]]:
    """The outline of ``kind`` on the unit square centred at 0 (radius about 1)."""
    if kind == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if kind == "triangle":
        return [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    if kind == "star":
        return [
            (r * math.cos(a - math.pi / 2), r * math.sin(a - math.pi / 2))
            for i, a in enumerate(np.linspace(0, 2 * math.pi, 11)[:-1])
            for r in [1.0 if i % 2 == 0 else 0.42]
        ]
    if kind == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                (-w, w), (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    if kind == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 40)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(float(a) / 17, float(b) / 17) for a, b in zip(x, y, strict=True)]
    raise ValueError(kind)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    kind = rng.choice(["flat", "gradient", "noise"])
    if kind == "flat":
        return Image.new("RGB", (width, height), _colour(rng))
    if kind == "gradient":
        a, b = np.asarray(_colour(rng), float), np.asarray(_colour(rng), float)
        t = np.linspace(0, 1, width)[None, :, None] if rng.random() < 0.5 else None
        t = t if t is not None else np.linspace(0, 1, height)[:, None, None]
        pixels = a + (b - a) * np.broadcast_to(t, (height, width, 1))
        return Image.fromarray(pixels.astype(np.uint8))
    base = np.asarray(_colour(rng), float)
    pixels = base + rng.normal(0, rng.uniform(10, 60), (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_object(image: Image.Image, kind: str, rng: np.random.Generator) -> None:
    width, height = image.size
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    radius = side * rng.uniform(0.18, 0.38)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    colour = _colour(rng)
    filled = rng.random() < 0.7
    line = max(2, int(radius * rng.uniform(0.1, 0.25)))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == "circle":
        draw.ellipse(box, fill=colour if filled else None, outline=colour, width=line)
        return
    if kind == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(radius * 0.35)))
        return
    if kind == "crescent":  # a disc minus a shifted disc, through a mask
        mask = Image.new("L", image.size, 0)
        shape = ImageDraw.Draw(mask)
        shape.ellipse(box, fill=255)
        shift = radius * rng.uniform(0.35, 0.6)
        angle = rng.uniform(0, 2 * math.pi)
        dx, dy = shift * math.cos(angle), shift * math.sin(angle)
        shape.ellipse([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], fill=0)
        image.paste(colour, (0, 0, width, height), mask)
        return
    angle = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    points = [
        (cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
        for x, y in _polygon(kind)
    ]
    draw.polygon(points, fill=colour if filled else None, outline=colour, width=line)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    for _ in range(rng.integers(0, 5)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.normal(0, width / 4), y0 + rng.normal(0, height / 4)
        if rng.random() < 0.5:
            draw.line([x0, y0, x1, y1], fill=_colour(rng), width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, min(width, height) / 10)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=_colour(rng))


def class_sizes(count: int, largest: int, smallest: int) -> list[int]:
    """Geometrically falling class sizes from ``largest`` to ``smallest``."""
    return [round(largest * (smallest / largest) ** (c / (count - 1))) for c in range(count)]


def build(out: Path, seed: int = 0, largest: int = 200, smallest: int = 16) -> dict[str, int]:
    """Write the folder under ``out`` (one sub-folder per class); return images per class."""
    sizes = class_sizes(len(CLASSES), largest, smallest)
    for c, (kind, n) in enumerate(zip(CLASSES, sizes, strict=True)):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, c, i])
            short = int(rng.integers(48, 200))
            aspect = rng.uniform(0.6, 1.7)
            width, height = (int(short * aspect), short) if aspect >= 1 else (
                short, int(short / aspect))  # fmt: skip
            image = _background(rng, width, height)
            _clutter(ImageDraw.Draw(image), rng, width, height)
            _draw_object(image, kind, rng)
            if rng.random() < 0.5:
                image.save(folder / f"{i:04d}.jpg", quality=int(rng.integers(40, 95)))
            else:
                image.save(folder / f"{i:04d}.png")
    return dict(zip(CLASSES, sizes, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--largest", type=int, default=200)
    parser.add_argument("--smallest", type=int, default=16)
    args = parser.parse_args()
    counts = build(args.out, args.seed, args.largest, args.smallest)
    print(f"{sum(counts.values())} images in {len(counts)} classes under {args.out}: {counts}")


if __name__ == "__main__":
    main()
