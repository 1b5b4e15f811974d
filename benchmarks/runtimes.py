"""The student in each runtime, side by side: PyTorch eager fp32, ONNX Runtime fp32 and int8.

    python benchmarks/runtimes.py [--threads 1] [--repeats 200] [--repo PATH] [--smoke]
    # after `dvc repro`

Separates what int8 buys from what the runtime buys: the evaluate stage runs
the fp32 student in PyTorch (its checkpoint) and the int8 model in ONNX
Runtime, so their latency ratio mixes both. Measures median ms per image at
batch 1 and batch 64 on the test split's images, same thread count, after
warm-up, interleaved in one process; ``--trials`` whole measurements give the
spread, and the JSON keeps every trial. Writes benchmarks/results/runtimes_<source>_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from tasks.checkpoints import load_checkpoint  # noqa: E402
from tasks.data.datasets import load_prepared  # noqa: E402
from tasks.data.pixels import normalise  # noqa: E402
from tasks.evaluation.latency import measure_latency  # noqa: E402
from tasks.export.onnx_io import torch_logits  # noqa: E402
from tasks.inference import onnx_logits, onnx_session  # noqa: E402
from tasks.layout import PREPARED_DIR, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8  # noqa: E402
from tasks.params import load_params  # noqa: E402


def measure(
    runtimes: dict[str, Callable[[np.ndarray], np.ndarray]],
    images: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """One trial: median ms/image per runtime at batch 1 and 64, runtimes interleaved."""
    results: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    rounds = 5  # interleave so machine noise hits every runtime alike
    for batch in (1, 64):
        samples: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(rounds):
            for name, predict in runtimes.items():
                latency = measure_latency(
                    predict, images[:batch], args.warmup, args.repeats // rounds
                )
                samples[name].append(latency["median_ms"])
        for name, values in samples.items():
            results[name][f"ms_per_image_b{batch}"] = statistics.median(values)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5, help="whole measurements, for the spread")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="a checkout where `dvc repro` has run"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="1 trial of 10 repeats: does the script run? (runtimes_*_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.repeats, args.warmup = 1, 10, 2

    os.chdir(args.repo)
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(STUDENT)
    model = checkpoint.build()
    fp32 = onnx_session(STUDENT_FP32_ONNX, args.threads)
    int8 = onnx_session(STUDENT_INT8, args.threads)
    runtimes = {
        "torch_eager_fp32": lambda x: torch_logits(model, x, batch_size=len(x)),
        "onnxruntime_fp32": lambda x: onnx_logits(fp32, x, batch_size=len(x)),
        "onnxruntime_int8": lambda x: onnx_logits(int8, x, batch_size=len(x)),
    }
    images = normalise(load_prepared(PREPARED_DIR).test.images[:64], checkpoint.stats)
    trials = [measure(runtimes, images, args) for _ in range(args.trials)]
    results = {
        name: {key: statistics.median(t[name][key] for t in trials) for key in trials[0][name]}
        for name in runtimes
    }
    ratios = [
        t["onnxruntime_int8"]["ms_per_image_b64"]
        / min(t["torch_eager_fp32"]["ms_per_image_b64"], t["onnxruntime_fp32"]["ms_per_image_b64"])
        for t in trials
    ]
    source = Path(load_params().data.source).name
    payload = {
        "command": f"python benchmarks/runtimes.py --threads {args.threads} "
        f"--repeats {args.repeats} --trials {args.trials}",
        "machine": describe_machine(),
        "threads": args.threads,
        "trials": args.trials,
        "ms_per_image": results,
        "ms_per_image_per_trial": trials,
        "int8_vs_fastest_fp32_b64_per_trial": ratios,
        "int8_vs_fastest_fp32_b64": statistics.median(ratios),
    }
    path = write_result(result_name(f"runtimes_{source}_cpu.json", args.smoke), payload)
    for name, values in results.items():
        print(f"{name:>17}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    print(f"int8 / fastest fp32 at batch 64: median {statistics.median(ratios):.2f} ({spread})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
