"""Which student: trunk depths and input sizes distilled from one teacher, through the real stages.

    python benchmarks/students.py --dataset NAME [--blocks 4 5 6 7 8] [--input-sizes auto 64]
                                  [--set SECTION.KEY=VALUE ...] [--out FILE]
    python benchmarks/students.py --repo PATH --smoke  # a checkout where dvc repro has run

With ``--dataset`` (one of ``benchmarks/suite.py``'s), runs the whole pipeline
once in a fresh copy on the committed defaults (``benchmarks/pipeline.py``),
then for each candidate sets ``distill.trunk_blocks`` and ``distill.input_size``
in that copy's params.yaml and runs ``dvc repro``: the teacher is not retrained,
only distill, quantize and evaluate run again. Every candidate is measured by
the same evaluate stage that judges the shipped student: test macro-F1 of the
fp32 and int8 student, the int8 file's size and its single-image latency
against the teacher's fastest fp32 runtime timed in the same run (the
``evaluate.student_budget`` verdict). ``distill.compare_scratch`` is off for
every candidate (the scratch twin would double each distill; ``kd_gain`` is
measured by the suite). The winner is the candidate with the best int8 val
macro-F1 (the quantize stage's, never test) among those within the budget.

``--repo`` works on a copy of an existing checkout instead (its outputs and DVC
cache included), so the checkout itself is left as it was; ``--smoke`` tries
one candidate, ``trunk_blocks: 4``. Writes ``benchmarks/results/students_<name>_<device>.json``
and prints the table for ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.pipeline import apply_overrides, dvc, stages_ran  # noqa: E402
from benchmarks.suite import copy_arguments, parse_settings, pipeline_copy, student_row  # noqa: E402


def measure(repo: Path, env: dict[str, str], blocks: int, input_size: int | str) -> dict[str, Any]:
    """One candidate: its distill params set, ``dvc repro``, then the suite's row of the
    stages' metrics with the budget verdict (``suite.student_row``)."""
    apply_overrides(
        repo,
        {"distill": {"trunk_blocks": blocks, "input_size": input_size, "compare_scratch": False}},
    )
    seconds, output = dvc(repo, env, "repro")
    return {
        "trunk_blocks": blocks,
        "input_size": input_size,
        "stages_ran": stages_ran(output),
        **student_row(repo),
        "repro_seconds": round(seconds, 1),
    }


def winner(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best int8 val macro-F1 within the budget (test is only reported, never chosen on)."""
    within = [row for row in rows if row["within_budget"]]
    return max(within, key=lambda row: row["int8_val_f1_macro"], default=None)


def table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> str:
    lines = [
        "| trunk blocks | input px | params | int8 val F1 | fp32 test F1 | int8 test F1 [interval] "
        "| int8 acc | gap to teacher | int8 KB | b1 latency / teacher's | within budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["student_int8_f1_macro_ci"] or (float("nan"), float("nan"))
        mark = " (chosen)" if r is chosen else ""
        ratio = r["latency_ratio_b1_vs_teacher"]
        lines.append(
            f"| {r['trunk_blocks']}{mark} | {r['input_size']} | {r['student_params']:,} "
            f"| {r['int8_val_f1_macro']:.3f} | {r['student_f1_macro']:.3f} "
            f"| {r['student_int8_f1_macro']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {r['student_int8_accuracy']:.3f} | {r['gap']:+.3f} "
            f"| {r['student_int8_bytes'] / 1000:.0f} "
            f"| {'—' if ratio is None else f'{ratio:.2f}'} "
            f"| {'yes' if r['within_budget'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    copy_arguments(parser)
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 5, 6, 7, 8])
    parser.add_argument("--input-sizes", nargs="+", default=["auto"], help="px, or auto")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
        help="params for the first run (a YAML value), as benchmarks/suite.py's --set",
    )  # fmt: skip
    parser.add_argument("--out", help="result file name (default students_<name>_<device>.json)")
    parser.add_argument("--smoke", action="store_true", help="one candidate: trunk_blocks 4")
    args = parser.parse_args()
    sizes = [size if size == "auto" else int(size) for size in args.input_sizes]
    candidates = [(4, "auto")] if args.smoke else [(b, s) for b in args.blocks for s in sizes]

    with pipeline_copy(args.dataset, args.repo, args.smoke, parse_settings(args.set)) as copy:
        rows = []
        for blocks, size in candidates:
            print(f"trunk_blocks {blocks}, input_size {size} ...", flush=True)
            rows.append(measure(copy.repo, copy.env, blocks, size))
            print(f"  {json.dumps(rows[-1])}", flush=True)
    name, first, server_stopped = copy.name, copy.first, copy.server_stopped
    chosen = winner(rows)
    print(table(rows, chosen))
    device = "gpu" if describe_machine()["gpu"] else "cpu"
    result = {
        "command": " ".join(["python", "benchmarks/students.py", *sys.argv[1:]]),
        "machine": describe_machine(),
        "dataset": name,
        "first_run": first,
        "candidates": rows,
        "server_stopped": server_stopped,
        "chosen": chosen and {key: chosen[key] for key in ("trunk_blocks", "input_size")},
    }
    out = args.out or result_name(f"students_{name}_{device}.json", args.smoke)
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
