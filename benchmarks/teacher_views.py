"""What cached teacher views save: a distilled epoch with the teacher per batch against K views.

    python benchmarks/teacher_views.py [--views 8] [--epochs 8] [--rounds 2] [--repo PATH]
                                       [--smoke]

In a checkout where ``dvc repro train`` has run (the default pipeline on digits
here, or a copy ``benchmarks/pipeline.py --keep`` left), fits the distill
stage's own student (``tasks.training.distill.fit_student``, params.yaml's
``distill`` and ``augment``, ``--epochs`` epochs, no early stop) four ways,
in one process, one after the other (after an unrecorded warm-up fit),
``--rounds`` times:

- ``per_batch``: ``distill.teacher_views: 0``, the teacher's forward pass on
  every augmented batch (the default);
- ``views_cold``: ``teacher_views: K`` with an empty cache: the teacher runs
  over K views of every image first, then the student trains on their logits;
- ``views_warm``: the same again, the logits read from the cache;
- ``scratch``: no teacher at all (the floor: what the student's own step costs).

Reports, per way, the median over rounds of the wall time of the whole fit
(teacher pass included), the student's train images per second in an epoch,
and the teacher's forward passes per image. Writes
benchmarks/results/teacher_views_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.train_throughput import first_train_rows  # noqa: E402
from tasks.layout import TEACHER  # noqa: E402
from tasks.params import load_params  # noqa: E402
from tasks.training.distill import fit_student, load_teacher  # noqa: E402
from tasks.training.inputs import load_training_data  # noqa: E402
from tasks.training.resume import STATE_DIR_ENV  # noqa: E402

WAYS = ("per_batch", "views_cold", "views_warm", "scratch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None, help="the first N train images")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="a checkout where the train stage has run"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="64 images, 2 views, 2 epochs, 1 round: does it run? (..._smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.views, args.epochs, args.rounds, args.max_images = 2, 2, 1, 64
    os.chdir(args.repo)  # the stage's own relative paths: data/, models/
    params = load_params("params.yaml")
    data = load_training_data.fn()
    if args.max_images:
        data = first_train_rows(data, args.max_images)
    teacher = load_teacher.fn(TEACHER)
    common = {"epochs": args.epochs, "min_steps": 0, "patience": args.epochs}
    settings = {
        "per_batch": params.distill.model_copy(update={**common, "teacher_views": 0}),
        "views": params.distill.model_copy(update={**common, "teacher_views": args.views}),
    }
    # Unrecorded: the process's first fit pays one-time costs (oneDNN's kernel choice).
    warm_up = settings["per_batch"].model_copy(update={"epochs": 1})
    fit_student.fn(data, teacher, warm_up, params.augment, params.seed, log=lambda _: None)
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for round_ in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as home:
            os.environ[STATE_DIR_ENV] = home  # an empty cache: the cold run computes
            for way in WAYS:
                fit_params = settings["per_batch" if way == "per_batch" else "views"]
                start = time.perf_counter()
                result = fit_student.fn(
                    data, None if way == "scratch" else teacher, fit_params, params.augment,
                    params.seed, log=lambda _: None,
                )  # fmt: skip
                wall = time.perf_counter() - start
                epochs = result.history
                run = {
                    "wall_seconds": round(wall, 2),
                    "student_images_per_second": round(
                        statistics.mean(r.images_per_second for r in epochs), 1
                    ),
                    "teacher_passes_per_image": result.notes["teacher_passes_per_image"],
                }
                runs[way].append(run)
                speed, passes = run["student_images_per_second"], run["teacher_passes_per_image"]
                print(f"round {round_} {way:>10}: {wall:7.1f} s, {speed:6.0f} img/s an epoch, "
                      f"{passes} teacher passes an image", flush=True)  # fmt: skip
    summary = {
        way: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for way, rounds in runs.items()
    }
    per_batch = summary["per_batch"]["wall_seconds"]
    for way in WAYS:
        summary[way]["wall_vs_per_batch"] = round(summary[way]["wall_seconds"] / per_batch, 3)
        print(f"{way:>10}: {summary[way]}")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    path = write_result(
        result_name(f"teacher_views_{device}.json", args.smoke),
        {
            "command": "python benchmarks/teacher_views.py " + " ".join(sys.argv[1:]),
            "machine": describe_machine(),
            "data_source": params.data.source,
            "train_images": len(data.train),
            "views": args.views,
            "epochs": args.epochs,
            "rounds": args.rounds,
            "distill": settings["views"].model_dump(mode="json"),
            "median": summary,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
