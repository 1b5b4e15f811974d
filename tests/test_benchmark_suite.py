"""``benchmarks/suite.py --smoke``: the whole pipeline on a small messy folder.

In a file of its own because it is the longest smoke run (about 5 minutes in CI):
pytest-xdist gives each file to one worker, and beside the other smoke runs of
``test_benchmarks.py`` it made that worker the last to finish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_runs import run_benchmark

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_suite_smoke_runs_the_pipeline_on_a_small_messy_folder(tmp_path: Path) -> None:
    done = run_benchmark("suite", "--smoke", results=tmp_path, timeout=1200)
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
