"""When does int8 pay on this CPU? Students of several sizes, fp32 vs int8, first conv int8 or not.

    python benchmarks/quantize_latency.py [--threads 1] [--repeats 100] [--smoke]

For each architecture, width and input size: the network (random weights,
realistic BatchNorm statistics: latency does not depend on what was learnt)
is exported to ONNX and quantized exactly as the quantize stage does, once
with every conv in int8 and once with the first conv (1 input channel) kept
fp32 (``quantize.keep_first_conv_fp32``). All runtimes of one network are
timed side by side with ``tasks.evaluation.latency.measure_runtimes`` (interleaved
rounds, same thread count), so ratios hold on a noisy shared machine even
when absolute times do not. Writes benchmarks/results/quantize_latency.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from tasks.evaluation.latency import BATCH, measure_runtimes  # noqa: E402
from tasks.export.onnx_io import export_onnx, torch_logits  # noqa: E402
from tasks.export.quantize import quantize_onnx  # noqa: E402
from tasks.inference import onnx_session  # noqa: E402
from tasks.models import build_model, count_params  # noqa: E402
from tasks.params import QuantizeParams  # noqa: E402

NETWORKS = [  # (model, width, input size): the digits default, then Fashion-MNIST candidates
    ("cnn", 16, 16),
    ("cnn", 16, 28),
    ("cnn", 32, 28),
    ("mobilenet", 16, 28),
    ("mobilenet", 32, 28),
]


def _network(name: str, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 1, 10, width, 0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def measure(name: str, width: int, size: int, threads: int, repeats: int, scratch: Path) -> dict:
    model = _network(name, width)
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((128, 1, size, size)).astype(np.float32)
    batch = rng.standard_normal((BATCH, 1, size, size)).astype(np.float32)
    fp32 = export_onnx(model, (1, size, size), scratch / f"{name}{width}_{size}.onnx", {})
    files = {"onnxruntime-fp32": fp32}
    for keep in (False, True):
        params = QuantizeParams(
            method="ptq", calibration_size=128, calibration_method="minmax", per_channel=True,
            keep_first_conv_fp32=keep, max_drop=0.003, qat_epochs=1, qat_lr=1e-4,
            qat_batch_size=64,
        )  # fmt: skip
        label = "onnxruntime-int8" + ("-first-conv-fp32" if keep else "-all-convs")
        files[label] = quantize_onnx.fn(fp32, scratch / f"{label}_{size}.onnx", calibration, params)
    torch.set_num_threads(threads)
    runtimes = {"torch-eager": (lambda x: torch_logits(model, x, len(x)), batch)}
    for label, path in files.items():
        session = onnx_session(path, threads)
        runtimes[label] = (lambda x, s=session: s.run(None, {"images": x}), batch)
    latency = measure_runtimes(runtimes, warmup=10, repeats=repeats)
    fastest_fp32 = min(latency[k].latency_ms_b64 for k in ("torch-eager", "onnxruntime-fp32"))
    return {
        "model": name,
        "width": width,
        "input": size,
        "params": count_params(model),
        "bytes": {label: path.stat().st_size for label, path in files.items()},
        "latency": {label: value.as_dict() for label, value in latency.items()},
        "int8_b64_vs_fastest_fp32": {
            label: round(latency[label].latency_ms_b64 / fastest_fp32, 3)
            for label in files
            if label.startswith("onnxruntime-int8")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--smoke", action="store_true",
        help="the first network, 5 repeats: does the script run? (quantize_latency_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    networks = NETWORKS[:1] if args.smoke else NETWORKS
    if args.smoke:
        args.repeats = 5
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, width, size in networks:
            row = measure(name, width, size, args.threads, args.repeats, Path(scratch))
            rows.append(row)
            print(
                f"{name:9s} w{width:<3d} {size}px {row['params']:6d} params  int8/fastest fp32 "
                f"at b64: {row['int8_b64_vs_fastest_fp32']}",
                flush=True,
            )
    path = write_result(
        result_name("quantize_latency.json", args.smoke),
        {
            "command": "python benchmarks/quantize_latency.py " + " ".join(sys.argv[1:]),
            "threads": args.threads,
            "machine": describe_machine(),
            "networks": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
