"""Where a training epoch's time goes: ``torch.profiler`` over the teacher's or the student's fit.

    python benchmarks/profile_fit.py [--stage train|distill] [--max-images 5120] [--top 15]
                                     [--repo PATH] [--warmup N] [--smoke]

After ``dvc repro prepare resample`` (and ``train``, for ``--stage distill``):
in a copy ``benchmarks/pipeline.py --keep`` left, it profiles that recipe. Runs
one epoch of the stage's own fit (``tasks.training.train.fit_teacher`` or
``tasks.training.distill.fit_student`` with the frozen teacher, the loaders and
augmentation of params.yaml) on the first ``--max-images`` train images, under
``torch.profiler`` (CPU activities, plus CUDA when the fit runs there), and
reports the operators with the most self time, and the shares of the epoch
spent in convolutions (forward and backward), in the batched augmentation's
ops (``grid_sampler``, ``affine_grid``), in the optimizer step and in the
rest. A fit whose time is convolutions has nothing a bare loop would not pay.
On a GPU one unprofiled epoch goes first (``--warmup``): the first epoch there
is cuDNN's autotuning and CUDA's lazy module loading, not the fit's steady state,
and the top operators name where the GPU itself was busy as well.
Writes benchmarks/results/profile_<stage>_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.train_throughput import first_train_rows  # noqa: E402
from tasks.layout import TEACHER  # noqa: E402
from tasks.params import load_params  # noqa: E402
from tasks.training.distill import fit_student, load_teacher  # noqa: E402
from tasks.training.inputs import load_training_data  # noqa: E402
from tasks.training.train import fit_teacher  # noqa: E402

# Operator-name fragments -> the share they are reported under (first match wins).
GROUPS = {
    "convolution": ("conv", "mkldnn_convolution", "cudnn_convolution"),
    "augmentation": ("grid_sampler", "affine_grid"),
    "batch norm": ("batch_norm",),
    "optimizer": ("adamw", "_foreach", "lerp", "addcdiv"),
}


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS.items():
        if any(fragment in lowered for fragment in fragments):
            return group
    return "other"


def top_ops(events: list, kind: str, top: int) -> list[dict]:
    """The ``top`` operators by self time on ``kind`` ("cpu": the host, "device": the GPU),
    printed and returned as rows: ``self_<kind>_share`` of that total, ``self_<kind>_ms``."""

    def spent(event) -> float:
        return getattr(event, f"self_{kind}_time_total")

    total = sum(spent(event) for event in events) or 1.0
    rows = [
        {
            "op": event.key,
            f"self_{kind}_share": round(spent(event) / total, 4),
            f"self_{kind}_ms": round(spent(event) / 1000, 1),
            "calls": event.count,
        }
        for event in sorted(events, key=spent, reverse=True)[:top]
    ]
    for row in rows:
        print(f"{row[f'self_{kind}_share']:7.1%}  {row[f'self_{kind}_ms']:9.1f} ms  {row['op']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["train", "distill"], default="train")
    parser.add_argument("--max-images", type=int, default=5120)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="a checkout where the stages before it have run"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unprofiled epochs first (default: 1 on a GPU, where the first epoch pays for "
        "cuDNN's autotuning and CUDA's lazy loading, 0 on a CPU)",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="64 images: does the script run? (profile_<stage>_<device>_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.max_images = 64
    os.chdir(args.repo)  # the stage's own relative paths: data/, models/
    params = load_params("params.yaml")
    data = load_training_data.fn()
    data = first_train_rows(data, args.max_images)
    section = params.train if args.stage == "train" else params.distill
    fit_params = section.model_copy(update={"epochs": 1, "min_steps": 0})
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)

    def quiet(line: str) -> None:
        pass

    def fit_once():
        if args.stage == "train":
            return fit_teacher.fn(data, fit_params, params.augment, params.seed, log=quiet)
        teacher = load_teacher.fn(TEACHER)
        return fit_student.fn(data, teacher, fit_params, params.augment, params.seed, log=quiet)

    warmup = args.warmup if args.warmup is not None else int(torch.cuda.is_available())
    for _ in range(warmup):
        fit_once()
    with profile(activities=activities) as prof:
        result = fit_once()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    shares: dict[str, float] = {}
    for event in events:
        group = group_of(event.key)
        shares[group] = shares.get(group, 0.0) + event.self_cpu_time_total / total
    rows_out = top_ops(events, "cpu", args.top)
    print({group: f"{share:.1%}" for group, share in sorted(shares.items())})
    device_rows: list[dict] = []
    if torch.cuda.is_available():  # where the GPU's own time went, beside the host's
        busy = sum(event.self_device_time_total for event in events)
        print(f"GPU busy {busy / 1e6:.2f} s of the epoch's kernels:")
        device_rows = top_ops(events, "device", args.top)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    path = write_result(
        result_name(f"profile_{args.stage}_{device}.json", args.smoke),
        {
            "command": "python benchmarks/profile_fit.py " + " ".join(sys.argv[1:]),
            "machine": describe_machine(),
            "stage": args.stage,
            "train_images": len(data.train),
            "warmup_epochs": warmup,
            "images_per_second": result.history[0].images_per_second,
            "params": fit_params.model_dump(mode="json"),
            "self_cpu_share_by_group": {k: round(v, 4) for k, v in sorted(shares.items())},
            "top_ops": rows_out,
            "top_device_ops": device_rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
