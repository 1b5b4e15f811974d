"""Does distillation pay on this data, beyond seed noise? kd_gain over several seeds.

    python benchmarks/kd_gain.py [--seeds 0 1 2 3 4] [--repo PATH] [--smoke]
    # after `dvc repro train`

One pipeline run reports one ``kd_gain`` (distilled minus scratch test
macro-F1), and on a small test split that is a few images either way. This
repeats the distill stage's own comparison for several seeds: per seed, the
student from scratch and the student distilled from ``models/teacher.pt``,
each configuration below, with the same initial weights and batches
(``tasks.training.distill.fit_student``, everything else as params.yaml says). The
stage core is called directly, without Prefect, MLflow or DVC.

Writes benchmarks/results/kd_gain_<source>_<device>.json and prints a
markdown table: test macro-F1 per configuration and its gain over scratch,
mean and standard deviation over the seeds, and on how many seeds it won.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from tasks.layout import PREPARED_DIR, RESAMPLED_DIR, TEACHER  # noqa: E402
from tasks.params import load_params  # noqa: E402
from tasks.training.distill import fit_student, load_teacher, score  # noqa: E402
from tasks.training.inputs import load_training_data  # noqa: E402

# name -> distill overrides; None is the student on labels alone
CONFIGS: dict[str, dict | None] = {
    "scratch": None,
    "KD (params.yaml)": {},
    "KD, temperature 2": {"temperature": 2.0},
    "KD + attention transfer": {"feature_loss": "attention"},
}


SMOKE_CONFIGS = ("scratch", "KD (params.yaml)")
SMOKE_FIT = {"epochs": 1, "min_steps": 0}


def _quiet(_: str) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="a checkout where `dvc repro train` has run"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="seed 0, scratch and KD, one epoch each: does the script run? (kd_gain_*_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in SMOKE_CONFIGS} if args.smoke else CONFIGS
    if args.smoke:
        args.seeds = [0]

    params = load_params(args.repo / "params.yaml")
    data = load_training_data.fn(args.repo / PREPARED_DIR, args.repo / RESAMPLED_DIR)
    teacher = load_teacher.fn(args.repo / TEACHER)
    scores: dict[str, list[float]] = {name: [] for name in configs}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for seed in args.seeds:
        for name, update in configs.items():
            distill = params.distill.model_copy(update={**SMOKE_FIT, **(update or {})}
                                                if args.smoke else update or {})  # fmt: skip
            start = time.perf_counter()
            result = fit_student.fn(
                data, None if update is None else teacher, distill, params.augment, seed,
                log=_quiet,
            )  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
            scores[name].append(score(result.model, data, "test", distill.batch_size).f1_macro)
            print(f"seed {seed} {name}: test f1_macro {scores[name][-1]:.4f}", flush=True)

    rows = {}
    for name, f1s in scores.items():
        gains = [f1 - base for f1, base in zip(f1s, scores["scratch"], strict=True)]
        rows[name] = {
            "test_f1_macro": f1s,
            "mean": statistics.fmean(f1s),
            "sd": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
            "kd_gain": gains,
            "kd_gain_mean": statistics.fmean(gains),
            "kd_gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "seeds_won": sum(gain > 0 for gain in gains),
            "seeds_lost": sum(gain < 0 for gain in gains),
            "fit_seconds_mean": statistics.fmean(seconds[name]),
        }
    device = "cuda" if describe_machine()["gpu"] else "cpu"
    path = write_result(
        result_name(f"kd_gain_{params.data.source}_{device}.json", args.smoke),
        {
            "command": "python benchmarks/kd_gain.py --seeds " + " ".join(map(str, args.seeds)),
            "machine": describe_machine(),
            "data_source": params.data.source,
            "test_size": len(data.prepared.test.labels),
            "teacher": str(TEACHER),
            "distill": params.distill.model_dump(),
            "configs": dict(configs),
            "results": rows,
        },
    )
    print(f"\n{len(args.seeds)} seeds, {len(data.prepared.test.labels)} test images\n")
    print("| student | test f1_macro | kd_gain | seeds won / lost |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        gain = "" if name == "scratch" else f"{row['kd_gain_mean']:+.4f} +- {row['kd_gain_sd']:.4f}"
        record = "" if name == "scratch" else f"{row['seeds_won']} / {row['seeds_lost']}"
        print(f"| {name} | {row['mean']:.4f} +- {row['sd']:.4f} | {gain} | {record} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
