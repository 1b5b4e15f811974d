"""The pipeline's train step against a bare PyTorch loop: what the DataLoader, augmentation,
AMP setting and per-epoch logging cost, for the committed teacher and student and for
small from-scratch networks.

    python benchmarks/train_throughput.py [--models teacher student resnet cnn]
        [--rounds 5] [--workers 0 1] [--precision fp32] [--no-device-path]
        [--max-images N] [--out NAME] [--smoke]

After ``dvc repro prepare resample`` (it trains on data/prepared, with the
models and augmentation of this checkout's params.yaml: run it in a copy
``benchmarks/pipeline.py --keep`` left to measure a recipe). The models:

- ``teacher``: ``train.model`` exactly as the train stage builds it (for the
  default, EfficientNet-Lite0 with its ImageNet weights at its input size);
- ``student``: ``distill.model`` as the distill stage builds it (the Lite0
  trunk), timed on the supervised step (its teacher's forward is not included);
- ``resnet``, ``cnn``, ``mobilenet``: ``train.model`` replaced by that
  from-scratch network, at ``train.width``.

For each model and DataLoader worker count, alternates in one process,
``--rounds`` times:

- **pipeline**: one epoch of ``tasks.training.engine.fit`` on the real train batches
  (``tasks.training.train.build_loaders``: the DataLoader with albumentations on the fly,
  the sampler and normalisation; and, as a separate row, ``data_on_device``:
  the split on the device, augmented there in batches), its batch size, optimizer,
  schedule, grad clipping, autocast setting, validation excluded (``fit``
  times the training loop alone, as ``images_per_second``);
- **bare**: the same model, batch size, precision and AdamW on the same
  images, normalised once and held in one tensor (channels_last, as ``fit``
  holds its batches), shuffled by index: the fastest this model can train on
  this machine.

``--max-images`` times the first N train rows only (an epoch of all of
Fashion-MNIST is minutes here; the ratio does not depend on the epoch's length).
``--smoke`` checks that the script runs, in seconds: 64 of scikit-learn's digits
in memory (no data/prepared needed), one round, no worker, result file
``train_throughput_smoke.json``.

The ratio of the two is taken per round (side by side, so machine noise hits
both) and the median is reported. Writes benchmarks/results/train_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.machine import describe_machine, write_result  # noqa: E402
from tasks.data.datasets import PreparedData, Split, take_rows  # noqa: E402
from tasks.data.pixels import ChannelStats, normalise  # noqa: E402
from tasks.params import FitParams, Params, load_params  # noqa: E402
from tasks.training.engine import fit, supervised_objective  # noqa: E402
from tasks.training.hardware import Precision, seed_everything, select_device  # noqa: E402
from tasks.training.inputs import (  # noqa: E402
    TrainingData,
    build_loaders,
    load_training_data,
    network_for,
    pretrained_view,
    supervised_loss,
)


def bare_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
               precision: Precision, device: torch.device) -> float:  # fmt: skip
    """Images/s of one epoch of the plainest loop: index, forward, backward, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(images))
    steps = len(images) // batch
    model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        rows = order[step * batch : (step + 1) * batch]
        x, y = images[rows], labels[rows]
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    loss.item()  # wait for the device
    return steps * batch / (time.perf_counter() - start)


def first_train_rows(data: TrainingData, count: int) -> TrainingData:
    """``data`` with only its first ``count`` train rows (and their sampling weights)."""
    rows = np.arange(min(count, len(data.train)))
    first = Split(take_rows(data.train.images, rows), np.asarray(data.train.labels)[rows])
    return replace(data, train=first, weights=np.asarray(data.weights)[rows])


MODELS = ("teacher", "student", "resnet", "cnn", "mobilenet")


def fit_params_for(name: str, params: Params) -> FitParams:
    """The fit params the model ``name`` trains with (see the module docstring)."""
    if name == "teacher":
        return params.train
    if name == "student":
        return params.distill
    return params.train.model_copy(update={"model": name, "pretrained": False})


def smoke_data() -> TrainingData:
    """64 train and 32 val images of scikit-learn's digits, in memory (``--smoke``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, val = Split(images[:64], labels[:64]), Split(images[64:96], labels[64:96])
    classes = tuple(str(i) for i in range(10))
    prepared = PreparedData(train, val, val, classes, ChannelStats.of(train.images))
    return TrainingData(prepared, train, np.ones(len(train)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS[:4]),
                        help="what to time (default: teacher student resnet cnn)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precision", default=None, help="default: train.precision")
    parser.add_argument("--no-device-path", action="store_true",
                        help="leave out the data_on_device row")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=None,
                        help="time only the first N train images")  # fmt: skip
    parser.add_argument(
        "--out", default=None, help="result file name (default: train_throughput_<device>.json)"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="64 digits in memory, 1 round, no worker: does it run?")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.workers = 1, [0]
        args.out = args.out or "train_throughput_smoke.json"
    params = load_params(ROOT / "params.yaml")
    precision_name = args.precision or params.train.precision
    data = smoke_data() if args.smoke else load_training_data.fn()
    if args.max_images is not None:
        data = first_train_rows(data, args.max_images)
    device = select_device(params.train.device)
    precision = Precision.of(precision_name, device)
    pixels = np.stack([data.train.images[i] for i in range(len(data.train))])
    images = torch.from_numpy(normalise(pixels, data.prepared.stats)).to(device)
    labels = torch.as_tensor(data.train.labels, dtype=torch.long).to(device)

    results, models = {}, {}
    paths = [(f"num_workers={workers}", False, workers) for workers in args.workers]
    if not args.no_device_path:
        paths.append(("data_on_device", True, 0))
    for model_name in args.models:
        base = fit_params_for(model_name, params)

        def model(base: FitParams = base) -> nn.Module:
            return network_for(data, base, log=lambda line: None).to(device)

        probe = model()
        models[model_name] = {
            "model": base.model,
            "pretrained": bool(getattr(base, "pretrained", False)),
            # what a pretrained network is resized to; the scratch nets see the stored size
            "input_size": (view.size if (view := pretrained_view(data, base)) else None),
            "params": sum(p.numel() for p in probe.parameters()),
            "batch_size": base.batch_size,
        }
        for path_name, on_device, workers in paths:
            name = f"{model_name}/{path_name}"
            # One epoch: min_steps 0, or a small split's budget would add epochs to it.
            fit_params = base.model_copy(
                update={"epochs": 1, "min_steps": 0, "num_workers": workers,
                        "precision": precision_name, "data_on_device": on_device}
            )  # fmt: skip
            pipeline, bare, ratios = [], [], []
            for round_ in range(args.rounds):
                seed_everything(round_, fit_params.deterministic)
                train_loader, val_loader = build_loaders(
                    data, fit_params, params.augment, round_, device
                )
                objective = supervised_objective(supervised_loss(fit_params, data).to(device))
                result = fit(model(), objective, train_loader, val_loader, fit_params, device,
                             on_epoch=lambda record: None, log=lambda line: None)  # fmt: skip
                pipeline.append(result.history[0].images_per_second)
                bare.append(bare_epoch(model(), images, labels, fit_params.batch_size,
                                       precision, device))  # fmt: skip
                ratios.append(pipeline[-1] / bare[-1])
                print(f"{name} round {round_ + 1}: pipeline {pipeline[-1]:.0f} img/s, "
                      f"bare {bare[-1]:.0f} img/s, ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
            results[name] = {
                "pipeline_images_per_second": pipeline,
                "bare_images_per_second": bare,
                "ratio_per_round": ratios,
                "median_ratio": statistics.median(ratios),
            }
    device_kind = "gpu" if device.type == "cuda" else "cpu"
    path = write_result(
        args.out or f"train_throughput_{device_kind}.json",
        {
            "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
            "machine": describe_machine(),
            "device": str(device),
            "precision": precision_name,
            "models": models,
            "augment": params.augment.model_dump(mode="json"),
            "train_images": len(data.train),
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
