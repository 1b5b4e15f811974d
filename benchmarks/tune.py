"""visionpipe tune on one dataset: its front, how long it took, and its winner's test score
against the default student's at the same budget.

    python benchmarks/tune.py --dataset NAME [--trials 12] [--max-kb K] [--max-latency-ms L]
    python benchmarks/tune.py --repo PATH --smoke  # a checkout where dvc repro has run
    python benchmarks/tune.py --replot benchmarks/results/tune_NAME_cpu.json  # the front again

With ``--dataset`` (one of ``benchmarks/suite.py``'s), runs the whole pipeline once in a
fresh copy on the committed defaults (``benchmarks/pipeline.py``): the default student
and its test scores. Then, in that copy, ``visionpipe tune`` with the budget given
(default: ``evaluate.student_budget``), timed; then ``dvc exp run --run-all`` runs the
experiment tune queued (distill, quantize and evaluate with the winner as the student),
and ``dvc exp apply`` brings its metrics into the copy: the winner's test scores, from the
same evaluate stage that scored the default. Test is read only there; tune chose on val.

``--repo`` works on a copy of an existing checkout instead (so the checkout is left as it
was); ``--smoke`` fits one candidate (``--trials 1``) of the two ``cnn`` ones, with a
generous latency limit.
Writes ``benchmarks/results/tune_<name>_<device>.json`` (with ``pareto.csv``'s rows) and
prints the front for ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_machine, result_name, results_dir, write_result  # noqa: E402
from benchmarks.pipeline import dvc, stages_ran, timed  # noqa: E402
from benchmarks.suite import copy_arguments, pipeline_copy, student_row  # noqa: E402
from tasks import tuning  # noqa: E402


def front_table(rows: list[dict[str, str]]) -> str:
    lines = [
        "| candidate | int8 | params | int8 KB | b1 ms | b64 ms | val F1 fp32 | val F1 int8 "
        "| fit s | within budget | on front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            continue
        mark = " **(winner)**" if r["winner"] == "True" else ""
        lines.append(
            f"| {r['candidate']}{mark} | {r['method'].upper()} | {int(r['params']):,} "
            f"| {int(r['int8_bytes']) / 1000:.0f} | {float(r['latency_ms_b1']):.3f} "
            f"| {float(r['latency_ms_b64']):.2f} | {float(r['val_f1_macro_fp32']):.3f} "
            f"| {float(r['val_f1_macro_int8']):.3f} | {float(r['fit_seconds']):.0f} "
            f"| {'yes' if r['within_budget'] == 'True' else 'no'} "
            f"| {'yes' if r['on_front'] == 'True' else 'no'} |"
        )
    return "\n".join(lines)


def replot(result_file: Path) -> None:
    """A result's front again, by the current rules of ``tasks/tuning.py``: the table and the
    figure beside the result file, from its rows (nothing is rerun)."""
    result = json.loads(result_file.read_text())
    rows = [tuning.Row(**_typed(row)) for row in result["pareto"]]
    budget = tuning.Budget(**result["tune"]["budget"])
    tuning.mark_front(rows)
    tuning.choose(rows, budget)
    fitted = sum(row.status == "ok" for row in rows)
    figure = result_file.with_suffix(".png")
    tuning.plot_front(figure, rows, budget, f"visionpipe tune: {fitted} int8 students")
    print(front_table([{k: str(v) for k, v in asdict(row).items()} for row in rows]))
    print(f"wrote {figure}")


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A pareto.csv row (all text) as ``tasks.tuning.Row``'s fields."""
    counts = ("trunk_blocks", "width", "input_size", "params", "int8_bytes")
    measures = ("latency_ms_b1", "latency_ms_b64", "val_f1_macro_fp32", "val_f1_macro_int8",
                "fit_seconds")  # fmt: skip
    numbers = {key: int for key in counts} | {key: float for key in measures}
    typed: dict[str, Any] = {}
    for key, value in row.items():
        if key in numbers:
            typed[key] = numbers[key](value) if value != "" else None
        elif key in ("within_budget", "on_front", "winner"):
            typed[key] = value == "True"
        else:
            typed[key] = value
    return typed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    if "--replot" in sys.argv:
        replot_parser = argparse.ArgumentParser()
        replot_parser.add_argument("--replot", type=Path, required=True)
        replot(replot_parser.parse_args().replot)
        return
    copy_arguments(parser)
    parser.add_argument("--trials", type=int, default=12, help="visionpipe tune --trials (12)")
    parser.add_argument("--max-kb", type=float, help="visionpipe tune --max-kb")
    parser.add_argument("--max-latency-ms", type=float, help="visionpipe tune --max-latency-ms")
    parser.add_argument("--out", help="result file name (default tune_<name>_<device>.json)")
    parser.add_argument("--families", nargs="+", help="visionpipe tune --families (all)")
    parser.add_argument(
        "--replot", type=Path, metavar="RESULT",
        help="redraw a result's front (table and .png) by the current rules",
    )  # fmt: skip
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one cnn fit (--families cnn), a generous latency limit",
    )
    args = parser.parse_args()
    tune_args = ["--trials", "1" if args.smoke else str(args.trials)]
    if args.max_kb is not None:
        tune_args += ["--max-kb", str(args.max_kb)]
    if args.families or args.smoke:
        tune_args += ["--families", *(args.families or ["cnn"])]
    if args.max_latency_ms is not None or args.smoke:
        tune_args += ["--max-latency-ms", str(args.max_latency_ms or 1000.0)]

    device = "gpu" if describe_machine()["gpu"] else "cpu"
    name = args.dataset or args.repo.resolve().name
    out = args.out or result_name(f"tune_{name}_{device}.json", args.smoke)
    with pipeline_copy(args.dataset, args.repo, args.smoke, {}) as copy:
        default = student_row(copy.repo)
        print(f"visionpipe tune {' '.join(tune_args)} ...", flush=True)
        tune_seconds, printed = timed(copy.repo, copy.env, "flows.cli", "tune", *tune_args)
        print(printed[-1500:], flush=True)
        summary = json.loads((copy.repo / "reports/tune/tune.json").read_text())
        with (copy.repo / "reports/tune/pareto.csv").open() as handle:
            front = list(csv.DictReader(handle))
        # the search's own files, kept before the experiment runs (it may fail on its own)
        figure = results_dir() / out.replace(".json", ".png")
        figure.parent.mkdir(parents=True, exist_ok=True)
        figure.write_bytes((copy.repo / "reports/tune/pareto.png").read_bytes())
        write_result(out, {"tune": summary, "pareto": front, "tune_seconds": tune_seconds})
        experiment = summary["queued"]["name"]
        print(f"dvc exp run --run-all ({experiment}) ...", flush=True)
        exp_seconds, output = dvc(copy.repo, copy.env, "exp", "run", "--run-all")
        dvc(copy.repo, copy.env, "exp", "apply", experiment)
        winner = student_row(copy.repo)
    print(front_table(front))
    result = {
        "command": " ".join(["python", "benchmarks/tune.py", *sys.argv[1:]]),
        "machine": describe_machine(),
        "dataset": copy.name,
        "first_run": copy.first,
        "tune_args": tune_args,
        "tune_seconds": round(tune_seconds, 1),
        "tune": summary,
        "pareto": front,
        "figure": figure.name,
        "experiment": {
            "name": experiment,
            "seconds": round(exp_seconds, 1),
            "stages_ran": stages_ran(output),
        },
        "default_student": default,
        "winner_student": winner,
        "winner_minus_default_int8_test_f1": winner["student_int8_f1_macro"]
        - default["student_int8_f1_macro"],
        "server_stopped": copy.server_stopped,
    }
    for label, row in (("default", default), ("winner", winner)):
        low, high = row["student_int8_f1_macro_ci"] or (float("nan"),) * 2
        print(f"{label}: {row['student_params']:,} params, int8 test macro-F1 "
              f"{row['student_int8_f1_macro']:.3f} [{low:.3f}, {high:.3f}], accuracy "
              f"{row['student_int8_accuracy']:.3f}, gap {row['gap']:+.3f}, "
              f"{row['student_int8_bytes'] / 1000:.0f} KB")  # fmt: skip
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
