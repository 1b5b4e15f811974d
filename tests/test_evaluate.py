"""Evaluate stage cores: metrics, latency per runtime, compression targets, confusion outputs;
and MLflow metric flattening. No test asserts a speed: that is the benchmarks' job."""

from __future__ import annotations

import csv
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
)

from tasks.evaluation import evaluate
from tasks.evaluation.evaluate import (
    ORT_FP32,
    ORT_INT8,
    TORCH_EAGER,
    Variant,
    comparison_markdown,
    compression_targets,
    measure_variants_latency,
    plot_confusion,
    write_confusion,
)
from tasks.evaluation.latency import (
    BATCH,
    Latency,
    b64_repeats,
    fastest,
    latency_metrics,
    measure_latency,
    measure_runtimes,
    tile_batch,
)
from tasks.evaluation.scoring import classification_report
from tasks.models import build_model
from tasks.tracking import scalar_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("cat", "dog", "eel")
# Class "eel" is never predicted; "dog" is over-predicted.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 1, 1, 1, 1, 1])


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict:
    """The report for hard predictions: probability 0.9 on the predicted class."""
    probs = np.full((len(predicted), len(classes)), 0.1 / (len(classes) - 1))
    probs[np.arange(len(predicted)), predicted] = 0.9
    return classification_report(labels, probs, classes, top_k=2)


def test_metrics_golden_values() -> None:
    metrics = classification_metrics(LABELS, PREDICTED, CLASSES)
    # Per class: cat P=1 R=1/2 F1=2/3; dog P=2/5 R=1 F1=4/7; eel F1=0.
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 4 / 7 + 0) / 3)  # 26/63
    assert metrics["f1_weighted"] == pytest.approx(26 / 63)  # equal supports
    assert metrics["precision_macro"] == pytest.approx((1 + 2 / 5 + 0) / 3)
    assert metrics["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["f1_per_class"] == pytest.approx({"cat": 2 / 3, "dog": 4 / 7, "eel": 0.0})


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    metrics = classification_metrics(labels, predicted, ("a", "b", "c", "d"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    for key, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert metrics[f"{key}_macro"] == pytest.approx(score(labels, predicted, average="macro"))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    per_class = f1_score(labels, predicted, average=None)
    assert list(metrics["f1_per_class"].values()) == pytest.approx(per_class.tolist())
    assert list(metrics["f1_per_class"]) == ["a", "b", "c", "d"]


def test_never_predicted_class_is_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(LABELS, PREDICTED, CLASSES)
    assert metrics["f1_per_class"]["eel"] == 0.0
    assert all(isinstance(value, float) for value in metrics["f1_per_class"].values())


def test_latency_on_a_trivial_function() -> None:
    latency = measure_latency(lambda x: x.sum(), np.ones((4, 1, 8, 8)), warmup=2, repeats=25)
    assert set(latency) == {"median_ms", "p95_ms"}
    assert 0 < latency["median_ms"] <= latency["p95_ms"]


def test_latency_is_per_image() -> None:
    def five_ms(batch: np.ndarray) -> None:
        time.sleep(0.005)

    latency = measure_latency(five_ms, np.ones((10, 1)), warmup=0, repeats=3)
    # 5 ms for a batch of 10 is at least 0.5 ms per image; far below the 5 ms per call.
    assert 0.5 <= latency["median_ms"] < 2.5


def test_latency_with_one_repeat() -> None:
    latency = measure_latency(lambda x: x, np.ones((1, 1)), warmup=0, repeats=1)
    assert latency["median_ms"] == latency["p95_ms"] > 0


def test_latency_p95_never_exceeds_the_slowest_call() -> None:
    durations = iter([0.010, 0.020, 0.030, 0.040, 0.050])

    def slower_each_call(batch: np.ndarray) -> None:
        time.sleep(next(durations))

    latency = measure_latency(slower_each_call, np.ones((1, 1)), warmup=0, repeats=5)
    # The slowest call took 50 ms plus scheduling overshoot; 'exclusive' gives ~57 ms.
    assert latency["p95_ms"] <= 53.0


@pytest.mark.parametrize(("num_classes", "min_side_px"), [(3, 480), (50, 2000)])
def test_plot_confusion_writes_png(tmp_path: Path, num_classes: int, min_side_px: int) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, size=(num_classes, num_classes))
    matrix[0] = 0  # a class with no test images: an empty row must not divide by zero
    classes = tuple(f"class_{i}" for i in range(num_classes))
    path = tmp_path / "confusion.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert plot_confusion(matrix, classes, "student (test)", path) == path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        width, height = image.size
    assert width == height >= min_side_px  # the figure grows with the class count


def test_write_confusion_csv_and_png(tmp_path: Path) -> None:
    classes = ("cat", "dog, large", "eel")  # a comma must survive the CSV round trip
    csv_path, png_path = write_confusion.fn("student", LABELS, PREDICTED, classes, tmp_path)
    assert csv_path == tmp_path / "student.csv"
    with csv_path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["actual", "predicted"]
    assert len(rows) == 1 + len(LABELS)
    assert rows[1:] == [[classes[a], classes[p]] for a, p in zip(LABELS, PREDICTED, strict=True)]
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_scalar_metrics_flattens_splits_intervals_and_drops_non_numbers() -> None:
    metrics = {
        "f1_macro": 0.9,
        "params": 1234,
        "runtime": "onnxruntime-int8",
        "stopped_early": True,
        "note": None,
        "f1_per_class": {"T-shirt/top": 0.8, "Ankle boot": 0.7, "what?": 0.1},
        "student": {"latency": {"median_ms": 0.2, "unit": "ms"}},
        "kd_gain_ci": [-0.01, 0.03],  # an interval: two metrics
        "latency_ms": [0.2, 0.3, 0.25],  # any other list: none
    }
    assert scalar_metrics(metrics) == {
        "f1_macro": 0.9,
        "params": 1234.0,
        "stopped_early": 1.0,
        "f1_per_class.T-shirt/top": 0.8,
        "f1_per_class.Ankle boot": 0.7,
        "f1_per_class.what_": 0.1,  # characters MLflow rejects become "_"
        "student.latency.median_ms": 0.2,
        "kd_gain_ci_low": -0.01,
        "kd_gain_ci_high": 0.03,
    }
    assert all(isinstance(value, float) for value in scalar_metrics(metrics).values())


def test_logit_adjustment_moves_decisions_towards_rare_classes() -> None:
    from tasks.evaluation.evaluate import adjust_logits

    logits = np.array([[2.0, 1.5], [0.2, 0.0]], dtype=np.float32)
    prior = (0.9, 0.1)
    assert adjust_logits(logits, prior, 0.0) is logits
    assert adjust_logits(logits, None, 1.0) is logits
    adjusted = adjust_logits(logits, prior, 1.0)
    np.testing.assert_allclose(adjusted, logits - np.log(prior), rtol=1e-6)
    assert adjusted.dtype == np.float32
    # the head class won both; after adjustment the close call goes to the rare class
    assert logits.argmax(axis=1).tolist() == [0, 0]
    assert adjusted.argmax(axis=1).tolist() == [1, 1]


LATENCY_KEYS = {"latency_ms_b1", "p95_ms_b1", "latency_ms_b64", "throughput_ips_b64"}


def test_measure_runtimes_interleaves_and_counts_calls() -> None:
    calls: list[tuple[str, int]] = []

    def recorder(name: str):
        return lambda batch: calls.append((name, len(batch)))

    batch = tile_batch(np.ones((3, 1, 4, 4), np.float32))
    runtimes = {name: (recorder(name), batch) for name in ("a", "b")}
    latency = measure_runtimes(runtimes, warmup=2, repeats=20)
    assert set(latency) == {"a", "b"}
    for name in ("a", "b"):
        assert set(latency[name].as_dict()) == LATENCY_KEYS
        assert calls.count((name, 1)) == 2 + 20  # warm-up, then the repeats
        assert calls.count((name, BATCH)) == 2 + b64_repeats(20)
        assert latency[name].throughput_ips_b64 == pytest.approx(
            BATCH * 1000.0 / latency[name].latency_ms_b64
        )
    # all warm-up first, then timed rounds in which both runtimes take turns
    timed = [name for name, _ in calls[8:]]
    assert timed[0] == "a" and "b" in timed[: len(timed) // 2] and timed[-1] == "b"


def test_batch_64_takes_fewer_repeats_but_never_fewer_than_ten() -> None:
    assert b64_repeats(200) == 20
    assert b64_repeats(5) == b64_repeats(1) == 10


def test_tile_batch_repeats_real_images_up_to_64() -> None:
    images = np.arange(5)[:, None, None, None] * np.ones((1, 1, 2, 2))
    batch = tile_batch(images)
    assert batch.shape == (BATCH, 1, 2, 2)
    assert batch[:, 0, 0, 0].tolist() == [i % 5 for i in range(BATCH)]
    assert tile_batch(np.ones((100, 1, 2, 2))).shape == (BATCH, 1, 2, 2)
    with pytest.raises(ValueError, match="no images"):
        tile_batch(np.ones((0, 1, 2, 2)))


def _latency(b1: float, b64: float) -> Latency:
    return Latency(
        latency_ms_b1=b1, p95_ms_b1=b1 * 1.5, latency_ms_b64=b64, throughput_ips_b64=64e3 / b64
    )


def test_fastest_runtime_is_the_lower_batch_64_latency() -> None:
    # eager wins at batch 1, ONNX Runtime at batch 64: batch 64 decides
    by_runtime = {TORCH_EAGER: _latency(0.10, 9.0), ORT_FP32: _latency(0.20, 3.0)}
    assert fastest(by_runtime) == ORT_FP32
    assert fastest({ORT_FP32: _latency(1.0, 5.0), TORCH_EAGER: _latency(1.0, 4.0)}) == TORCH_EAGER
    with pytest.raises(ValueError):
        fastest({})


def test_latency_metrics_report_the_fastest_runtime_and_keep_all() -> None:
    by_runtime = {TORCH_EAGER: _latency(0.10, 9.0), ORT_FP32: _latency(0.20, 3.0)}
    metrics = latency_metrics(by_runtime)
    assert metrics["runtime"] == ORT_FP32
    assert metrics["latency_ms_b64"] == 3.0 and metrics["latency_ms_b1"] == 0.20
    assert metrics["throughput_ips_b64"] == pytest.approx(64e3 / 3.0)
    assert metrics["p95_ms_b1"] == pytest.approx(0.30)
    assert metrics["latency_by_runtime"] == {
        TORCH_EAGER: by_runtime[TORCH_EAGER].as_dict(),
        ORT_FP32: by_runtime[ORT_FP32].as_dict(),
    }


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_measure_variants_latency_times_torch_and_onnxruntime(tiny_prepared, params) -> None:
    """A tiny cnn in PyTorch eager and in ONNX Runtime (exported on the fly, as the teacher
    is); the 20 test images are fewer than 64, so the batch repeats them."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, width=4, dropout=0.0).eval()
    session = evaluate._teacher_session(model, (1, 8, 8), threads=1)  # its folder is gone
    fp32 = Variant(
        name="student",
        predict=evaluate._torch_predict(model),
        artifact=Path("unused"),
        runtimes={
            TORCH_EAGER: evaluate._torch_predict(model),
            ORT_FP32: evaluate._onnx_predict(session),
        },
        params=0,
        classes=tiny_prepared.classes,
        stats=tiny_prepared.stats,
        run_params={},
        source_run_id=None,
    )
    images = evaluate.normalise(tiny_prepared.test.images, fp32.stats)
    np.testing.assert_allclose(  # the same network in both runtimes
        fp32.runtimes[ORT_FP32](images), fp32.runtimes[TORCH_EAGER](images), rtol=1e-4, atol=1e-4
    )
    quick = params.evaluate.model_copy(update={"latency_warmup": 1, "latency_repeats": 3})
    latency = measure_variants_latency.fn([fp32], tiny_prepared.test.images, quick)
    assert set(latency) == {"student"}
    assert set(latency["student"]) == {TORCH_EAGER, ORT_FP32}
    for measured in latency["student"].values():
        numbers = measured.as_dict()
        assert set(numbers) == LATENCY_KEYS
        assert all(np.isfinite(v) and v > 0 for v in numbers.values())


STUDENT_LATENCY = {TORCH_EAGER: _latency(0.10, 8.0), ORT_FP32: _latency(0.05, 2.0)}


def test_compression_targets_all_met() -> None:
    targets = compression_targets(
        fp32_onnx_bytes=100_000,
        int8_onnx_bytes=28_000,
        student_latency=STUDENT_LATENCY,
        int8_latency=_latency(0.04, 1.2),
        student_f1_macro=0.983,
        int8_f1_macro=0.980,  # exactly 0.3 points: met despite float rounding
    )
    assert set(targets) == {"size_ratio", "latency_ratio_b64", "f1_macro_drop"}
    assert targets["size_ratio"]["value"] == pytest.approx(0.28)
    # against the fastest fp32 runtime (ONNX Runtime, 2 ms), not eager PyTorch (8 ms)
    assert targets["latency_ratio_b64"]["value"] == pytest.approx(0.6)
    assert ORT_FP32 in targets["latency_ratio_b64"]["reference"]
    assert targets["f1_macro_drop"]["value"] == pytest.approx(0.003)
    assert [t["target"] for t in targets.values()] == [0.3, 0.7, 0.003]
    assert all(t["met"] is True for t in targets.values())


def test_compression_targets_missed() -> None:
    targets = compression_targets(
        fp32_onnx_bytes=101_846,
        int8_onnx_bytes=35_757,
        student_latency=STUDENT_LATENCY,
        # 0.5x eager PyTorch would pass; 2x the fastest fp32 runtime does not
        int8_latency=_latency(0.04, 4.0),
        student_f1_macro=0.98,
        int8_f1_macro=0.97,
    )
    assert targets["size_ratio"]["value"] == pytest.approx(0.3511, abs=1e-4)
    assert targets["latency_ratio_b64"]["value"] == pytest.approx(2.0)
    assert targets["f1_macro_drop"]["value"] == pytest.approx(0.01)
    assert not any(t["met"] for t in targets.values())
    # an int8 model better than its fp32 student is a negative drop: met
    better = compression_targets(1, 1, STUDENT_LATENCY, _latency(1, 1), 0.9, 0.95)
    assert better["f1_macro_drop"]["met"] is True


def _results(int8_b1: float, int8_b64: float, int8_bytes: int) -> dict:
    row = {"f1_macro": 0.98, "accuracy": 0.98, "params": 24_058, "size_bytes": 100_000}
    student = {**row, **latency_metrics(STUDENT_LATENCY)}
    int8_latency = {ORT_INT8: _latency(int8_b1, int8_b64)}
    int8 = {**row, "size_bytes": int8_bytes, **latency_metrics(int8_latency)}
    int8["targets"] = compression_targets(100_000, int8_bytes, STUDENT_LATENCY,
                                          int8_latency[ORT_INT8], 0.98, 0.98)  # fmt: skip
    return {"student": student, "student_int8": int8}


def test_markdown_says_plainly_which_target_is_missed() -> None:
    markdown = comparison_markdown(_results(int8_b1=0.08, int8_b64=1.0, int8_bytes=35_000))
    assert "## Compression targets (student_int8 vs student)" in markdown
    assert "| size_ratio | 0.3500 | <= 0.3 | **NO (missed)** |" in markdown
    assert "| latency_ratio_b64 | 0.5000 | <= 0.7 | yes |" in markdown
    assert "**1 of 3 targets missed:** size_ratio is 0.3500, above the target 0.3." in markdown
    # faster at batch 64, slower than ONNX Runtime fp32 at batch 1: said, not hidden
    assert f"slower than the fp32 model in {ORT_FP32} at batch 1: 0.080 vs 0.050" in markdown
    assert sum(line.startswith("- student_int8 ") for line in markdown.splitlines()) == 1
    # every runtime's numbers, the reported one marked
    assert f"| student | {ORT_FP32} | 0.050 | 0.075 | 2.000 | 32,000 | fastest |" in markdown
    assert f"| student | {TORCH_EAGER} | 0.100 | 0.150 | 8.000 | 8,000 |  |" in markdown


def test_markdown_when_every_target_is_met() -> None:
    markdown = comparison_markdown(_results(int8_b1=0.04, int8_b64=1.0, int8_bytes=25_000))
    assert "All compression targets met." in markdown
    assert "missed" not in markdown.lower() and "slower" not in markdown


def test_new_latency_numbers_become_mlflow_metrics() -> None:
    flat = scalar_metrics(_results(int8_b1=0.08, int8_b64=1.0, int8_bytes=35_000)["student_int8"])
    for key in ("latency_ms_b1", "p95_ms_b1", "latency_ms_b64", "throughput_ips_b64"):
        assert flat[key] > 0
        assert flat[f"latency_by_runtime.{ORT_INT8}.{key}"] == flat[key]
    assert "runtime" not in flat  # a string: logged as the run's tag instead
    assert flat["targets.size_ratio.value"] == pytest.approx(0.35)
    assert flat["targets.size_ratio.met"] == 0.0
    assert flat["targets.latency_ratio_b64.met"] == 1.0
