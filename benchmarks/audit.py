"""Does the audit find planted errors? Precision and recall per kind, and the stage's time.

    python benchmarks/audit.py [--only messy-folder fashion-mnist-300] [--seeds 1 2] [--smoke]

For each dataset, in a fresh copy of the repository: write the ImageFolder
under ``data/raw/`` (the suite's generated messy folder, or 300 Fashion-MNIST
training images per class as PNG files), then plant errors in it:

- **label errors**: 5% of the images moved to a random other class's folder;
- **near-copies**: 3% of the images (others than those moved) saved again in
  their class folder, changed as a second save of a photo is: cropped by 0-1
  pixels on each side (one more on a side with probability 0.3), resized by a
  factor of 0.85-1.5, shifted in colour by up to 8 grey levels per channel and
  re-encoded as JPEG at quality 55-90.

Then ``dvc repro --single-item audit`` and ``prepare`` run as a user's ``dvc
repro`` would (defaults, ``data.source`` set), and the reports are scored:

- label errors: precision and recall of the ``label_issue`` rows against the
  moved files (a moved file's suggested class is right when it names the folder
  it came from);
- near-duplicates: pairs. A planted (original, copy) pair is found when both
  sit in one reported cluster; precision counts every pair inside every
  cluster, so a natural near-duplicate pair the folder already had counts
  against it;
- leakage: planted pairs whose members prepare put in different splits, with
  ``audit.split_groups: true`` (the default) and, rerunning prepare only, false.

Writes ``benchmarks/results/audit_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.messy_folder import build as build_messy_folder  # noqa: E402
from benchmarks.pipeline import apply_overrides, dvc  # noqa: E402
from benchmarks.workspace import copy_env, fresh_copy, git  # noqa: E402
from tasks.data.sources import FASHION_MNIST_CLASSES, read_idx  # noqa: E402
from tasks.servers import stop_local_server  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LABEL_FRACTION = 0.05
COPY_FRACTION = 0.03


def fashion_folder(out: Path, per_class: int = 300) -> None:
    """The first ``per_class`` training images of each Fashion-MNIST class, as PNG files."""
    images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        folder = out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


DATASETS: dict[str, Callable[[Path, bool], None]] = {
    "messy-folder": lambda out, smoke: build_messy_folder(
        out, seed=0, **({"largest": 30, "smallest": 20} if smoke else {})
    ),
    "fashion-mnist-300": lambda out, smoke: fashion_folder(out, 40 if smoke else 300),
}


def near_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The image saved again: cropped a little, resized, colour-shifted, re-encoded as JPEG."""
    width, height = image.size
    cut = rng.integers(0, 2, 4) + (rng.random(4) < 0.3)
    image = image.crop((cut[0], cut[1], width - cut[2], height - cut[3]))
    factor = rng.uniform(0.85, 1.5)
    size = (max(8, round(image.width * factor)), max(8, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    grey = image.mode in ("L", "LA")
    pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.int16)
    shift = rng.integers(-8, 9, 1 if grey else 3)
    shifted = Image.fromarray(np.clip(pixels + shift, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    shifted.save(buffer, "JPEG", quality=int(rng.integers(55, 91)))
    return Image.open(io.BytesIO(buffer.getvalue()))


def plant(folder: Path, seed: int) -> dict[str, Any]:
    """Move 5% of the files to a wrong class and add near-copies of 3%; return the truth."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    order = rng.permutation(len(files))
    moved_count = round(LABEL_FRACTION * len(files))
    copied_count = round(COPY_FRACTION * len(files))
    moved: dict[str, str] = {}  # new path -> true class
    for k in order[:moved_count]:
        source = files[k]
        true_class = source.parent.name
        wrong = rng.choice([c for c in classes if c != true_class])
        target = folder / wrong / f"{source.stem}_from_{true_class}{source.suffix}"
        source.rename(target)
        moved[str(target.relative_to(folder))] = true_class
    pairs = []
    for k in order[moved_count : moved_count + copied_count]:
        source = files[k]
        copy = source.with_name(f"{source.stem}_copy.jpg")
        with Image.open(source) as image:
            near_copy(image, rng).save(copy, quality=95)
        pairs.append((str(source.relative_to(folder)), str(copy.relative_to(folder))))
    return {"images": len(files) + len(pairs), "moved": moved, "pairs": pairs}


def rates(found: int, flagged: int, planted: int) -> dict[str, float]:
    """Precision (of what was flagged) and recall (of what was planted)."""
    return {
        "precision": round(found / max(flagged, 1), 3),
        "recall": round(found / max(planted, 1), 3),
    }


def score(report: dict[str, Any], truth: dict[str, Any], root: str) -> dict[str, Any]:
    """Precision and recall of label issues and near-duplicate pairs against the truth."""

    def relative(path: str) -> str:
        return str(Path(path).relative_to(root))

    flagged = {relative(r["path"]): r for r in report["flagged"] if r["kind"] == "label_issue"}
    moved = truth["moved"]
    hits = [path for path in flagged if path in moved]
    right_class = sum(flagged[p]["suggested"] == moved[p] for p in hits)
    clusters = [[relative(p) for p in members] for members in report["clusters"]]
    found_pairs = {
        frozenset(pair) for members in clusters for pair in itertools.combinations(members, 2)
    }
    planted = {frozenset(pair) for pair in truth["pairs"]}
    true_pairs = found_pairs & planted
    return {
        "label_issues": {
            "planted": len(moved),
            "flagged": len(flagged),
            "found": len(hits),
            **rates(len(hits), len(flagged), len(moved)),
            "suggested_true_class": right_class,
            "not_checked": report["label_issues_skipped"],
        },
        "near_duplicates": {
            "planted_pairs": len(planted),
            "pairs_in_clusters": len(found_pairs),
            "found": len(true_pairs),
            **rates(len(true_pairs), len(found_pairs), len(planted)),
            "clusters": len(clusters),
        },
    }


def leaked(prepared: Path, truth: dict[str, Any], root: str) -> int:
    """Planted pairs whose two images prepare put in different splits."""
    split_of = {}
    for name in ("train", "val", "test"):
        for path in json.loads((prepared / name / "names.json").read_text()):
            split_of[str(Path(path).relative_to(root))] = name
    return sum(
        1
        for a, b in truth["pairs"]
        if a in split_of and b in split_of and split_of[a] != split_of[b]
    )


def run_one(name: str, seed: int, smoke: bool, log: Callable[[str], None] = print) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="visionpipe-audit-"))
    repo = fresh_copy(scratch / "repo", "audit benchmark copy")
    try:
        source = f"data/raw/{name}"
        DATASETS[name](repo / source, smoke)
        truth = plant(repo / source, seed)
        apply_overrides(repo, {"data": {"source": source}})
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "planted folder")
        env = copy_env(scratch / "state")
        try:
            audit_seconds, _ = dvc(repo, env, "repro", "--single-item", "audit")
            prepare_seconds, _ = dvc(repo, env, "repro", "--single-item", "prepare")
            report = json.loads((repo / "reports/audit.json").read_text())
            metrics = json.loads((repo / "metrics/audit.json").read_text())
            grouped = leaked(repo / "data/prepared", truth, source)
            apply_overrides(repo, {"audit": {"split_groups": False}})
            dvc(repo, env, "repro", "--single-item", "prepare")
            ungrouped = leaked(repo / "data/prepared", truth, source)
        finally:
            stop_local_server(scratch / "state" / "prefect")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "dataset": name,
        "seed": seed,
        "images": truth["images"],
        **score(report, truth, source),
        "leaked_pairs": {"split_groups_true": grouped, "split_groups_false": ungrouped},
        "audit_stage_seconds": round(audit_seconds, 1),
        "audit_flow_seconds": metrics["seconds"],
        "prepare_stage_seconds": round(prepare_seconds, 1),
        "input_size": report["input_size"],
    }
    log(json.dumps(result))
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | seed | images | label errors P / R (flagged) | near-dup pairs P / R (planted) "
        "| planted pairs across splits (groups on / off) | audit stage s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        li, nd = r["label_issues"], r["near_duplicates"]
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['images']} | {li['precision']} / {li['recall']} "
            f"({li['flagged']}) | {nd['precision']} / {nd['recall']} ({nd['planted_pairs']}) | "
            f"{r['leaked_pairs']['split_groups_true']} / {r['leaked_pairs']['split_groups_false']}"
            f" | {r['audit_stage_seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(DATASETS), help="these datasets only")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2],
        help="which files are planted (one run each)",
    )
    parser.add_argument("--smoke", action="store_true", help="small folders: does it run?")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [
        run_one(name, seed, args.smoke)
        for name in args.only or list(DATASETS)
        for seed in args.seeds
    ]
    device = "gpu" if describe_machine()["gpu"] else "cpu"
    path = write_result(
        result_name(f"audit_{device}.json", args.smoke),
        {
            "command": " ".join(["python", "benchmarks/audit.py", *sys.argv[1:]]),
            "machine": describe_machine(),
            "runs": rows,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
