"""Which imbalance method helps on long-tailed data: every strategy, 3 seeds, the teacher.

    python benchmarks/imbalance.py [--source digits] [--ratio 50] [--seeds 0 1 2]
                                   [--params OVERRIDES.yaml] [--set SECTION.KEY=VALUE ...]
                                   [--smoke]

For each seed, prepares ``--source`` with ``data.imbalance_ratio: --ratio`` (a
long-tailed TRAIN split; val and test stay balanced), then for every method
below resamples, trains the teacher exactly as params.yaml describes it, and
scores it on the test split. The stage cores are called directly (no Prefect,
no MLflow, no DVC) so that 50+ fits take minutes; everything else is the
pipeline's own code. Methods: every ``resample.strategy`` (SMOTE-like ones in
pixel space, plain SMOTE also in embedding space), every ``train.class_weight``,
focal loss with and without class weights, post-hoc logit adjustment
(``evaluate.logit_adjust_tau: 1``) and stronger minority augmentation
(``augment.minority_boost: 3``).

Also measures, at the stored size, how many images per second one DataLoader
worker augments and normalises, next to how many the training step consumes
(the teacher's fit) and a bare forward/backward loop on pre-loaded tensors: the
loader is not the bottleneck when one worker outpaces the step.

``--params`` and ``--set`` change params.yaml's values for this run only, as
``benchmarks/pipeline.py``'s do (a smaller teacher or ``data.max_per_class``
where every method on the whole dataset would take hours); the result records
them. Writes benchmarks/results/imbalance_<source>_rho<ratio>.json and prints a
markdown table (mean +- standard deviation over the seeds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.pipeline import merge_overrides, overrides_from  # noqa: E402
from tasks.data.datasets import Rows, Split, load_prepared  # noqa: E402
from tasks.data.prepare import (  # noqa: E402
    copy_splits,
    decode,
    select,
    split,
    staging_file,
)
from tasks.data.resample import resample  # noqa: E402
from tasks.data.sources import build_source, cap_per_class  # noqa: E402
from tasks.data.spec import image_spec  # noqa: E402
from tasks.evaluation.scoring import adjust_logits  # noqa: E402
from tasks.metrics import f1_macro  # noqa: E402
from tasks.params import Params, parse_params  # noqa: E402
from tasks.training.engine import predict_logits  # noqa: E402
from tasks.training.inputs import TrainingData, train_augment  # noqa: E402
from tasks.training.loaders import ImageDataset, make_loader  # noqa: E402
from tasks.training.train import fit_teacher  # noqa: E402

# name -> (resample overrides, train overrides, augment overrides, logit adjustment tau)
METHODS: dict[str, tuple[dict, dict, dict, float]] = {
    "plain CE": ({}, {}, {}, 0.0),
    "random_over": ({"strategy": "random_over"}, {}, {}, 0.0),
    "random_under": ({"strategy": "random_under"}, {}, {}, 0.0),
    "smote": ({"strategy": "smote"}, {}, {}, 0.0),
    "smote (embeddings)": ({"strategy": "smote", "space": "embeddings"}, {}, {}, 0.0),
    "borderline_smote": ({"strategy": "borderline_smote"}, {}, {}, 0.0),
    "adasyn": ({"strategy": "adasyn"}, {}, {}, 0.0),
    "smote_tomek": ({"strategy": "smote_tomek"}, {}, {}, 0.0),
    "smote_enn": ({"strategy": "smote_enn"}, {}, {}, 0.0),
    "balanced_sampler": ({"strategy": "balanced_sampler"}, {}, {}, 0.0),
    "class_weight balanced": ({}, {"class_weight": "balanced"}, {}, 0.0),
    "class_weight sqrt_inv": ({}, {"class_weight": "sqrt_inv"}, {}, 0.0),
    "class_weight effective_number": ({}, {"class_weight": "effective_number"}, {}, 0.0),
    "focal": ({}, {"loss": "focal"}, {}, 0.0),
    "focal + balanced": ({}, {"loss": "focal", "class_weight": "balanced"}, {}, 0.0),
    "logit adjustment (tau 1)": ({}, {}, {}, 1.0),
    "minority augmentation x3": ({}, {}, {"minority_boost": 3.0}, 0.0),
}
SMOKE_METHODS = ("plain CE", "smote")
SMOKE = {
    "data": {"max_per_class": 60},
    "train": {"model": "cnn", "pretrained": False, "width": 8, "epochs": 1, "min_steps": 0},
}


def prepare(params: Params, source: str, ratio: float, seed: int, out: Path) -> None:
    """The prepare stage's cores, in order, into ``out``."""
    data = params.data.model_copy(update={"source": source, "imbalance_ratio": ratio})
    items = cap_per_class(build_source(data), data.max_per_class, seed)
    spec = image_spec(data, items, seed)
    with staging_file(out, len(items), spec) as staging:
        decoded = decode.fn(items, spec, staging, workers=1, log=lambda line: None)
        selection = select.fn(items, decoded, data.min_per_class)
        plan = split.fn(items, selection, data, seed)
        copy_splits(
            staging,
            plan,
            items.labels,
            items.item_names,
            out,
            items.classes,
            spec,
            log=lambda line: None,
        )


def run(params: Params, prepared_dir: Path, method: str, seed: int) -> dict:
    resample_update, train_update, augment_update, tau = METHODS[method]
    prepared = load_prepared(prepared_dir)
    result = resample.fn(
        prepared.train,
        prepared.num_classes,
        params.resample.model_copy(update=resample_update),
        seed,
        prepared.stats,
    )
    images = Rows(prepared.train.images, result.indices, result.synthetic.images)
    labels = np.concatenate([prepared.train.labels[result.indices], result.synthetic.labels])
    data = TrainingData(prepared, Split(images, labels), result.weights)
    train = params.train.model_copy(update=train_update)
    augment = params.augment.model_copy(update=augment_update)
    fitted = fit_teacher.fn(data, train, augment, seed)
    test = make_loader(prepared.test, prepared.stats, 256, seed=seed)
    logits = adjust_logits(
        predict_logits(fitted.model, test, torch.device("cpu")), tuple(data.class_prior), tau
    )
    predicted = logits.argmax(axis=1)
    return {
        "f1_macro": f1_macro(prepared.test.labels, predicted, prepared.num_classes),
        "balanced_accuracy": float(balanced_accuracy_score(prepared.test.labels, predicted)),
        "train_images": len(labels),
        "epochs_run": len(fitted.history),
        "fit_images_per_second": statistics.mean(r.images_per_second for r in fitted.history),
    }


def throughput(params: Params, prepared_dir: Path, seed: int, count: int = 4000) -> dict:
    """Images/s: one worker's augmentation, the fit's consumption, a bare training loop."""
    prepared = load_prepared(prepared_dir)
    weights = np.ones(len(prepared.train))
    data = TrainingData(prepared, prepared.train, weights)
    augment = train_augment(data, params.augment, seed)
    dataset = ImageDataset(prepared.train, prepared.stats, augment)
    order = np.random.default_rng(seed).integers(0, len(dataset), count)
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    augment_rate = count / (time.perf_counter() - start)

    from tasks.models import build_model

    torch.manual_seed(seed)
    height, _, channels = prepared.image_shape
    model = build_model(
        params.train.model, channels, prepared.num_classes, params.train.width, params.train.dropout
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    batch = params.train.batch_size
    x = torch.randn(batch, channels, height, height)
    y = torch.randint(0, prepared.num_classes, (batch,))
    model.train()
    steps = 60
    for step in range(steps + 10):
        if step == 10:  # after warm-up
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    bare_rate = steps * batch / (time.perf_counter() - start)
    return {
        "augment_images_per_second_per_worker": round(augment_rate, 1),
        "bare_train_step_images_per_second": round(bare_rate, 1),
        "augment_pipeline": [type(t).__name__ for t in dataset.augment.common.transforms],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="digits")
    parser.add_argument("--ratio", type=float, default=50.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--params", type=Path, help="a YAML file of params.yaml sections to change")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="change one key (YAML value), after --params; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="seed 0, ratio 5, plain CE and smote, a one-epoch CNN teacher on 60 images a "
        "class: does the script run? (imbalance_*_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.methods, args.ratio = [0], list(SMOKE_METHODS), 5.0

    overrides = overrides_from(args.params, [])
    if args.smoke:
        overrides = merge_overrides(overrides, SMOKE)
    overrides = merge_overrides(overrides, overrides_from(None, args.assignments))
    raw = merge_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    try:
        params = parse_params(raw, origin="params.yaml with the overrides")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    scores: dict[str, list[dict]] = {method: [] for method in args.methods}
    failures: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            prepared_dir = Path(tmp) / f"prepared-{seed}"
            prepare(params, args.source, args.ratio, seed, prepared_dir)
            counts = np.bincount(load_prepared(prepared_dir).train.labels).tolist()
            print(f"seed {seed}: long-tailed train class counts {counts}", flush=True)
            for method in args.methods:
                try:
                    score = run(params, prepared_dir, method, seed)
                except ValueError as exc:  # a sampler that cannot work on this data says why
                    failures.setdefault(method, str(exc))
                    print(f"  {method:32s} failed: {exc}", flush=True)
                    continue
                scores[method].append(score)
                print(
                    f"  {method:32s} f1_macro {score['f1_macro']:.4f}  "
                    f"balanced_accuracy {score['balanced_accuracy']:.4f}",
                    flush=True,
                )
        speed = throughput(params, Path(tmp) / f"prepared-{args.seeds[0]}", args.seeds[0])

    def summary(values: list[float]) -> dict:
        return {
            "mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "runs": [round(v, 4) for v in values],
        }

    table = {
        method: {
            "f1_macro": summary([r["f1_macro"] for r in runs]),
            "balanced_accuracy": summary([r["balanced_accuracy"] for r in runs]),
            "train_images": round(statistics.mean(r["train_images"] for r in runs)),
            "fit_images_per_second": round(
                statistics.mean(r["fit_images_per_second"] for r in runs), 1
            ),
        }
        for method, runs in scores.items()
        if runs
    }
    best = max(table, key=lambda m: table[m]["f1_macro"]["mean"])
    baseline = table.get("plain CE", {}).get("f1_macro", {}).get("mean")
    speed["fit_images_per_second"] = table[args.methods[0]]["fit_images_per_second"]
    result = {
        "command": "python benchmarks/imbalance.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "source": args.source,
        "imbalance_ratio": args.ratio,
        "seeds": args.seeds,
        "overrides": overrides,
        "data": params.data.model_dump(mode="json"),
        "teacher": params.train.model_dump(mode="json"),
        "methods": table,
        "failed": failures,
        "best": best,
        "best_gain_over_plain_ce": None
        if baseline is None
        else round(table[best]["f1_macro"]["mean"] - baseline, 4),
        "throughput": speed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = f"imbalance_{Path(args.source).name}_rho{args.ratio:g}.json"
    path = write_result(result_name(name, args.smoke), result)

    print("\n| method | test f1_macro | test balanced accuracy | train images |")
    print("|---|---|---|---|")
    for method, row in sorted(table.items(), key=lambda kv: -kv[1]["f1_macro"]["mean"]):
        f1, bacc = row["f1_macro"], row["balanced_accuracy"]
        print(
            f"| {method} | {f1['mean']:.3f} ± {f1['std']:.3f} | "
            f"{bacc['mean']:.3f} ± {bacc['std']:.3f} | {row['train_images']} |"
        )
    for method, reason in failures.items():
        print(f"| {method} | failed: {reason} | | |")
    print(f"\nbest: {best}; throughput: {speed}; wrote {path}")


if __name__ == "__main__":
    main()
