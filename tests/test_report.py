"""The comparison table says plainly which compression target was met and which missed."""

from __future__ import annotations

from tasks.evaluation.report import comparison_markdown
from tasks.evaluation.results import ORT_FP32, TORCH_EAGER
from tests.evaluations import evaluate_results


def test_markdown_says_plainly_which_target_is_missed() -> None:
    markdown = comparison_markdown(evaluate_results(int8_b1=0.08, int8_b64=1.0, int8_bytes=35_000))
    assert "## Compression targets and budget (student_int8)" in markdown
    assert "| size_ratio | 0.3500 | <= 0.3 | **NO (missed)** |" in markdown
    assert "| latency_ratio_b64 | 0.5000 | <= 0.7 | yes |" in markdown
    assert "**1 of 5 targets missed:** size_ratio is 0.3500, above the target 0.3." in markdown
    assert "| int8_bytes | 35,000 | <= 1,000,000 | yes | the int8 ONNX file |" in markdown
    assert "| latency_ratio_b1_vs_teacher | 0.2667 | <= 0.333 | yes |" in markdown
    # faster at batch 64, slower than ONNX Runtime fp32 at batch 1: said, not hidden
    assert f"slower than the fp32 model in {ORT_FP32} at batch 1: 0.080 vs 0.050" in markdown
    assert sum(line.startswith("- student_int8 ") for line in markdown.splitlines()) == 1
    # every runtime's numbers, the reported one marked
    assert f"| student | {ORT_FP32} | 0.050 | 0.075 | 2.000 | 32,000 | fastest |" in markdown
    assert f"| student | {TORCH_EAGER} | 0.100 | 0.150 | 8.000 | 8,000 |  |" in markdown


def test_markdown_when_every_target_is_met() -> None:
    markdown = comparison_markdown(evaluate_results(int8_b1=0.04, int8_b64=1.0, int8_bytes=25_000))
    assert "All compression targets and the budget met." in markdown
    assert "missed" not in markdown.lower() and "slower" not in markdown
