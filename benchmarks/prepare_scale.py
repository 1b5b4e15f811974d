"""Prepare at scale: throughput and peak memory for 10k and 100k 64x64 RGB images.

    python benchmarks/prepare_scale.py [--images 1000 10000 30000 100000] [--workers 1 auto]
                                       [--smoke]

Generates an ImageFolder of synthetic 64x64 RGB JPEGs (10 classes of random
shapes on random backgrounds, every image distinct) once per size under
``--cache`` and runs the real prepare stage (``python -m flows.prepare``) on it
in a fresh copy of the repository, with ``data.image_size: 64, channels: 3``
and ``audit.split_groups: false`` (prepare alone, without the audit stage that
``dvc repro`` runs before it).
While the stage runs, the memory of its whole process tree (the stage and its
decode workers) is sampled every 0.1 s. Reported per run:

- ``wall_seconds`` of the stage command and ``images_per_second`` over it
  (includes importing Prefect and writing the splits);
- ``decode_images_per_second``, the rate the stage logs for decoding alone;
- ``peak_pss_mb``: the peak of the summed proportional set size (shared pages
  counted once across processes: the memory the tree really holds);
- ``peak_rss_mb``: the peak of the summed resident set size (shared pages
  counted in every process, so an over-estimate).

The Prefect server is started beforehand and is not part of the measured tree.
Writes benchmarks/results/prepare_scale.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.workspace import copy_env, fresh_copy  # noqa: E402
from tasks.servers import start_local_server, stop_local_server  # noqa: E402

CLASSES = 10
SIZE = 64


def _draw(index: int) -> Image.Image:
    """Image ``index``: class ``index % CLASSES`` decides the shape, the rest is random."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(1 + index % CLASSES // 3):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE // 2, 2))
        x1, y1 = (int(v) for v in rng.integers(SIZE // 2, SIZE, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if index % 2 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def _write_range(args: tuple[Path, int, int]) -> None:
    root, start, stop = args
    for index in range(start, stop):
        _draw(index).save(root / f"class{index % CLASSES}" / f"{index:06d}.jpg", quality=90)


def image_folder(cache: Path, count: int) -> Path:
    """An ImageFolder of ``count`` images under ``cache``, generated once."""
    root = cache / f"imagefolder-{count}"
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
    step = 1000
    ranges = [(root, s, min(s + step, count)) for s in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_write_range, ranges)
    done.write_text(str(count))
    return root


def _tree_memory(process: psutil.Process) -> tuple[float, float]:
    """Summed (PSS, RSS) in MB of ``process`` and its descendants."""
    pss = rss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss += info.rss
    return pss / 2**20, rss / 2**20


def run_prepare(repo: Path, env: dict[str, str], source: Path, workers: str) -> dict:
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["data"].update(
        source=str(source), image_size=SIZE, channels=3, resize="stretch", workers=workers
    )
    params["audit"]["split_groups"] = False  # prepare alone: no audit stage before it
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(repo / "data" / "prepared", ignore_errors=True)

    log = repo / "prepare.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.prepare"],
            cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
        watched = psutil.Process(process.pid)
        peak_pss = peak_rss = 0.0
        while process.poll() is None:
            pss, rss = _tree_memory(watched)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if process.returncode != 0:
        raise SystemExit(f"prepare failed:\n{text}")
    rates = re.findall(r"decode: (\d+)/(\d+) \((\d+) img/s\)", text)
    images = yaml.safe_load((repo / "metrics" / "prepare.json").read_text())["images"]
    return {
        "images": images,
        "workers": workers,
        "wall_seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 1),
        "decode_images_per_second": int(rates[-1][2]) if rates else None,
        "peak_pss_mb": round(peak_pss, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "prepared_bytes": sum(
            f.stat().st_size for f in (repo / "data" / "prepared").rglob("*") if f.is_file()
        ),
    }


def linear_fit(runs: list[dict]) -> dict | None:
    """Least-squares ``wall_seconds = fixed + per_image * images`` and how far each run is off.

    Linear growth shows as small residuals; ``fixed`` is the stage's start-up
    (importing Prefect, reporting the flow run), paid once whatever the size.
    """
    if len(runs) < 3:
        return None
    images = np.array([r["images"] for r in runs], dtype=float)
    seconds = np.array([r["wall_seconds"] for r in runs])
    per_image, fixed = np.polyfit(images, seconds, 1)
    predicted = fixed + per_image * images
    return {
        "fixed_seconds": round(float(fixed), 2),
        "ms_per_image": round(float(per_image) * 1000, 4),
        "max_relative_residual": round(float(np.max(np.abs(seconds - predicted) / seconds)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1_000, 10_000, 30_000, 100_000])
    parser.add_argument("--workers", nargs="+", default=["1", "auto"])
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "visionpipe-prepare-scale"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="100, 150 and 200 images (10 a class at least; a line needs three): "
        "does the script run? "
        "(prepare_scale_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.images = [100, 150, 200]

    scratch = Path(tempfile.mkdtemp(prefix="visionpipe-bench-"))
    repo = fresh_copy(scratch / "repo", "benchmark copy")
    env = copy_env(scratch / "state")
    start_local_server(scratch / "state" / "prefect")
    runs = []
    try:
        for count in args.images:
            started = time.perf_counter()
            source = image_folder(args.cache, count)
            print(f"{count} images ready in {time.perf_counter() - started:.0f} s", flush=True)
            # Every worker setting at 10k (or the smallest size); the others with the last.
            compare = 10_000 if 10_000 in args.images else min(args.images)
            for workers in args.workers if count == compare else args.workers[-1:]:
                run = run_prepare(repo, env, source, workers)
                runs.append(run)
                print(run, flush=True)
    finally:
        stop_local_server(scratch / "state" / "prefect")
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "command": "python benchmarks/prepare_scale.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "image": f"{SIZE}x{SIZE} RGB JPEG, stored as {SIZE}x{SIZE}x3 uint8",
        "runs": runs,
        "linear_fit": linear_fit([r for r in runs if r["workers"] == args.workers[-1]]),
    }
    path = write_result(result_name("prepare_scale.json", args.smoke), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
