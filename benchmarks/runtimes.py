"""The student in each runtime, side by side: PyTorch eager fp32, ONNX Runtime fp32 and int8.

    python benchmarks/runtimes.py [--threads 1] [--repeats 200]   # after `dvc repro`

Separates what int8 buys from what the runtime buys: the evaluate stage runs
the fp32 student in PyTorch (its checkpoint) and the int8 model in ONNX
Runtime, so their latency ratio mixes both. Measures median ms per image at
batch 1 and batch 64 on the test split's images, same thread count, after
warm-up, interleaved in one process. Writes benchmarks/results/runtimes_<source>_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine import describe_machine, write_result  # noqa: E402
from tasks.checkpoints import load_checkpoint  # noqa: E402
from tasks.datasets import load_prepared  # noqa: E402
from tasks.evaluate import measure_latency  # noqa: E402
from tasks.layout import PREPARED_DIR, STUDENT, STUDENT_FP32_ONNX, STUDENT_INT8  # noqa: E402
from tasks.params import load_params  # noqa: E402
from tasks.quantize import onnx_logits, onnx_session, torch_logits  # noqa: E402
from tasks.transforms import normalise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    import os

    os.chdir(ROOT)
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
    results: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    for batch in (1, 64):
        # Interleave the runtimes in rounds so machine noise hits all of them alike.
        rounds = 5
        samples: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(rounds):
            for name, predict in runtimes.items():
                samples[name].append(
                    measure_latency(predict, images[:batch], args.warmup, args.repeats // rounds)[
                        "median_ms"
                    ]
                )
        for name, values in samples.items():
            results[name][f"latency_ms_b{batch}"] = sorted(values)[len(values) // 2]
    fastest_fp32 = min(
        results["torch_eager_fp32"]["latency_ms_b64"], results["onnxruntime_fp32"]["latency_ms_b64"]
    )
    source = Path(load_params().data.source).name
    payload = {
        "command": f"python benchmarks/runtimes.py --threads {args.threads} "
        f"--repeats {args.repeats}",
        "machine": describe_machine(),
        "threads": args.threads,
        "ms_per_image": results,
        "int8_vs_fastest_fp32_b64": results["onnxruntime_int8"]["latency_ms_b64"] / fastest_fp32,
    }
    path = write_result(f"runtimes_{source}_cpu.json", payload)
    for name, values in results.items():
        print(f"{name:>17}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(
        f"int8 / fastest fp32 at batch 64: {payload['int8_vs_fastest_fp32_b64']:.2f}; wrote {path}"
    )


if __name__ == "__main__":
    main()
