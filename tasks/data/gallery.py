"""The audit's gallery: one self-contained HTML page of what it flagged, as pictures.

Each near-duplicate cluster side by side, each suspected mislabel with its
given and suggested class, then outliers and blank or extreme images. The
thumbnails are the images as the pipeline stores them (what the model sees),
scaled up with nearest-neighbour and inlined as PNG data URIs, so the page is
one file that opens anywhere (a browser, the MLflow UI's artifact view).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

THUMB_PX = 96

KIND_TITLES = {
    "label_issue": "Likely label errors (given class, then the class the features suggest)",
    "outlier": "Outliers (far from every other image)",
    "blank": "Nearly blank images",
    "too_dark": "Very dark images",
    "too_bright": "Very bright images",
}


def thumbnail(row: np.ndarray) -> str:
    """A uint8 HWC image as an inline PNG, at least THUMB_PX wide."""
    image = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
    scale = max(1, THUMB_PX // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{src}" alt=""><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
figure{display:inline-block;margin:4px;text-align:center;vertical-align:top;max-width:180px}
figure img{image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:11px;word-break:break-all}
.group{border:1px solid #ddd;border-radius:4px;padding:4px;margin:6px 0}
"""


def render(
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    clusters: list[list[int]],
    image_of: Callable[[str], np.ndarray],
    per_kind: int,
) -> str:
    """The page: counts first, then up to ``per_kind`` images (or clusters) per kind."""
    counts = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in summary.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>visionpipe audit</title>",
        f"<style>{STYLE}</style></head><body><h1>Data audit</h1><p>{html.escape(counts)}.",
        " Nothing was deleted or moved: list files in the audit.exclude file to leave them",
        " out of the next run.</p>",
    ]
    duplicates = [r for r in rows if r["kind"] == "near_duplicate"]
    by_path = {r["path"]: r for r in duplicates}
    parts.append(f"<h2>Near-duplicate clusters ({len(clusters)})</h2>")
    for number, members in enumerate(clusters[:per_kind]):
        figures = "".join(
            _figure(thumbnail(image_of(path)), f"{path} ({by_path[path]['class']})")
            for path in members
        )
        parts.append(f"<div class='group'><b>cluster {number}</b><br>{figures}</div>")
    for kind, title in KIND_TITLES.items():
        flagged = [r for r in rows if r["kind"] == kind]
        if not flagged:
            continue
        parts.append(f"<h2>{html.escape(title)} ({len(flagged)})</h2><div>")
        for row in flagged[:per_kind]:
            caption = f"{row['path']}: {row['class']}"
            if kind == "label_issue":
                caption += f" -> {row['suggested']} (p given {row['given_probability']:.2f})"
            else:
                caption += f" (score {row['score']})"
            parts.append(_figure(thumbnail(image_of(row["path"])), caption))
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def suspects_table(report: dict[str, Any], top: int, kind: str | None = None) -> str:
    """``visionpipe audit``: the counts, then the top suspects of each kind as a Markdown table."""
    counts = report["counts"]
    lines = [
        f"{counts['embedded']} images audited: {counts['near_duplicate_clusters']} near-duplicate "
        f"clusters ({counts['near_duplicate_images']} images), {counts['label_issues']} likely "
        f"label errors, {counts['outliers']} outliers, "
        f"{counts['blank'] + counts['too_dark'] + counts['too_bright']} blank or extreme",
    ]
    for name, why in report.get("label_issues_skipped", {}).items():
        lines.append(f"label errors not checked in class {name}: {why}")
    kinds = [kind] if kind else ["label_issue", "near_duplicate", "outlier", *list(KIND_TITLES)[2:]]
    lines += [
        "",
        "| kind | score | class | suggested | cluster | path |",
        "|---|---|---|---|---|---|",
    ]
    for name in kinds:
        rows = [r for r in report["flagged"] if r["kind"] == name][:top]
        lines += [
            f"| {r['kind']} | {r['score']} | {r['class']} | {r.get('suggested') or ''} | "
            f"{'' if r['cluster'] is None else r['cluster']} | {r['path']} |"
            for r in rows
        ]
    return "\n".join(lines)
