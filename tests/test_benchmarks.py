"""Every benchmark script runs: ``--help`` answers without side effects, and smoke modes end
to end, each checked for the shape of the result file it writes.

A committed measurement script that crashes is a broken promise: these run the scripts
as a user does (``python benchmarks/NAME.py``), in a subprocess (``--help`` for all of them
in one), so they are in the ``integration`` tier. Smoke runs write into
``$VISIONPIPE_BENCHMARK_RESULTS`` (a temporary folder), never over ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.machine import RESULTS, RESULTS_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.stem
    for path in (ROOT / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)

pytestmark = pytest.mark.integration


def _env(results: Path) -> dict[str, str]:
    """A script's environment: its results into ``results``, one thread per process."""
    return {**os.environ, RESULTS_ENV: str(results), "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str, results: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *args],
        cwd=ROOT, env=_env(results), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_every_script_is_found() -> None:
    assert {"faults", "train_throughput", "pipeline", "suite", "serve_load"} <= set(SCRIPTS)


# Every script's ``--help`` in one interpreter, each run as ``python benchmarks/NAME.py --help``
# would run it (runpy, as __main__): one start-up of torch and MLflow instead of one per script.
# What each left behind is checked after each one, so a script that writes is named.
_HELP_DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
results, listing = os.environ["VISIONPIPE_BENCHMARK_RESULTS"], sys.argv[1]
def files():
    return sorted((name, os.stat(os.path.join(listing, name)).st_mtime)
                  for name in os.listdir(listing))
answers = {}
for script in sys.argv[2:]:
    before, stdout, stderr = files(), io.StringIO(), io.StringIO()
    sys.argv = [f"benchmarks/{script}.py", "--help"]
    code = "no exit"
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(f"benchmarks/{script}.py", run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code = traceback.format_exc()
    answers[script] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                       "wrote_results": os.path.exists(results), "listing_same": files() == before}
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    results = tmp_path_factory.mktemp("help") / "results"
    done = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, str(RESULTS), *SCRIPTS],
        cwd=ROOT, env=_env(results), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_options_and_does_nothing_else(
    script: str, help_answers: dict[str, dict]
) -> None:
    answer = help_answers[script]
    assert answer["code"] == 0, (answer["code"], answer["stderr"][-2000:])
    assert answer["stdout"].startswith("usage:"), answer["stdout"][:500]
    assert "--" in answer["stdout"].split("\n", 1)[1]  # options are listed, not the usage only
    assert not answer["wrote_results"]
    assert answer["listing_same"]


def test_train_throughput_smoke_times_the_committed_teacher_and_student(tmp_path: Path) -> None:
    done = _run("train_throughput", "--smoke", results=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "train_throughput_smoke.json").read_text())
    assert result["train_images"] == 64
    models = result["models"]
    assert set(models) == {"teacher", "student", "resnet", "cnn"}
    # the committed defaults, as the stages build them: pretrained, not the scratch nets
    assert models["teacher"]["pretrained"] and models["student"]["pretrained"]
    assert not models["resnet"]["pretrained"] and not models["cnn"]["pretrained"]
    assert models["teacher"]["params"] > models["student"]["params"] > 0
    assert models["teacher"]["input_size"] > 8 and models["resnet"]["input_size"] is None
    assert set(result["results"]) == {
        f"{model}/{path}" for model in models for path in ("num_workers=0", "data_on_device")
    }
    for row in result["results"].values():
        assert len(row["ratio_per_round"]) == 1
        assert row["pipeline_images_per_second"][0] > 0 and row["bare_images_per_second"][0] > 0
        assert row["median_ratio"] == pytest.approx(
            row["pipeline_images_per_second"][0] / row["bare_images_per_second"][0]
        )
    assert result["machine"]["cpu_count"] >= 1


def test_quantize_latency_smoke_times_fp32_and_both_int8_forms(tmp_path: Path) -> None:
    done = _run("quantize_latency", "--smoke", results=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "quantize_latency_smoke.json").read_text())
    (row,) = result["networks"]
    int8 = {"onnxruntime-int8-all-convs", "onnxruntime-int8-first-conv-fp32"}
    assert set(row["bytes"]) == {"onnxruntime-fp32", *int8}
    assert set(row["latency"]) == {"torch-eager", "onnxruntime-fp32", *int8}
    assert set(row["int8_b64_vs_fastest_fp32"]) == int8
    assert all(ratio > 0 for ratio in row["int8_b64_vs_fastest_fp32"].values())
    assert row["bytes"]["onnxruntime-int8-all-convs"] < row["bytes"]["onnxruntime-fp32"]


def test_prefect_overhead_smoke_times_each_mode(tmp_path: Path) -> None:
    done = _run("prefect_overhead", "--smoke", results=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prefect_overhead_smoke.json").read_text())
    assert result["tasks_per_flow"] == 2
    modes = {"plain", "local-server", "ephemeral"}
    assert set(result["process_seconds"]) == modes
    assert all(len(values) == 1 and values[0] > 0 for values in result["process_seconds"].values())
    assert set(result["overhead_seconds_per_stage"]) == {"local-server", "ephemeral"}
    assert result["local_server_start_seconds"] > 0


def test_prepare_scale_smoke_runs_prepare_and_fits_a_line(tmp_path: Path) -> None:
    done = _run(
        "prepare_scale", "--smoke", "--cache", str(tmp_path / "cache"), results=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prepare_scale_smoke.json").read_text())
    runs = result["runs"]
    assert sorted({r["images"] for r in runs}) == [100, 150, 200]
    assert all(r["wall_seconds"] > 0 and r["images_per_second"] > 0 for r in runs)
    assert set(result["linear_fit"]) == {"fixed_seconds", "ms_per_image", "max_relative_residual"}


def test_faults_smoke_runs_the_quickest_cases(tmp_path: Path) -> None:
    done = _run("faults", "--smoke", results=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "faults_smoke.json").read_text())
    assert [row["case"] for row in result["cases"]] == ["hostile-folder", "orphaned-server"]
    for row in result["cases"]:
        assert row["did"] and row["lost"].startswith("nothing"), row  # no data lost


def test_imbalance_smoke_scores_each_method(tmp_path: Path) -> None:
    done = _run("imbalance", "--smoke", results=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "imbalance_digits_rho5_smoke.json").read_text())
    assert (result["seeds"], result["imbalance_ratio"]) == ([0], 5.0)
    assert set(result["methods"]) | set(result["failed"]) == {"plain CE", "smote"}
    for row in result["methods"].values():
        (f1,) = row["f1_macro"]["runs"]
        assert 0.0 <= f1 <= 1.0 and row["train_images"] > 0
    assert result["teacher"]["model"] == "cnn" and result["throughput"]


def test_messy_folder_writes_the_long_tailed_folder_it_prints(tmp_path: Path) -> None:
    out = tmp_path / "messy"
    done = _run("messy_folder", str(out), "--largest", "6", "--smallest", "2", results=tmp_path,
                timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {folder.name: len(list(folder.iterdir())) for folder in sorted(out.iterdir())}
    assert len(counts) == 10 and max(counts.values()) == 6 and min(counts.values()) == 2
    assert f"{sum(counts.values())} images in 10 classes" in done.stdout


@pytest.mark.slow
def test_suite_smoke_runs_the_pipeline_on_a_small_messy_folder(tmp_path: Path) -> None:
    done = _run("suite", "--smoke", results=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (written,) = tmp_path.glob("suite_*_smoke.json")
    result = json.loads(written.read_text())
    assert result["complete"]
    (row,) = result["runs"]
    assert (row["dataset"], row["pretrained"], row["status"]) == ("messy-folder", True, "ok"), row
    assert (row["image_size"], row["channels"]) == (16, 3)
    for key in ("teacher_f1_macro", "student_f1_macro", "student_int8_f1_macro"):
        assert 0.0 <= row[key] <= 1.0
    assert list(row["stage_seconds"]) == [
        "audit", "prepare", "resample", "train", "distill", "quantize", "evaluate",
    ]  # fmt: skip
    assert "| messy-folder | pretrained |" in done.stdout  # the README's table


def test_audit_smoke_plants_errors_and_scores_what_the_stage_found(tmp_path: Path) -> None:
    done = _run(
        "audit", "--smoke", "--only", "messy-folder", "--seeds", "1",
        results=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads((tmp_path / "audit_cpu_smoke.json").read_text())["runs"]
    planted = run["near_duplicates"]["planted_pairs"]
    assert run["dataset"] == "messy-folder" and planted >= 5
    assert run["label_issues"]["planted"] >= 8
    # the generated shapes are easy copies: every planted pair is found, and none leaks
    assert run["near_duplicates"]["found"] == planted
    assert run["leaked_pairs"]["split_groups_true"] == 0
    assert 0 <= run["label_issues"]["precision"] <= 1 and run["audit_stage_seconds"] > 0
