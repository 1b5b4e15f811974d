"""The pipeline from a fresh clone: wall time per stage, the no-op rerun, the results.

    python benchmarks/pipeline.py [--params OVERRIDES.yaml] [--set SECTION.KEY=VALUE ...] [--keep]
                                  [--smoke]
    python benchmarks/pipeline.py --params benchmarks/fashion_mnist.yaml   # the real benchmark
    python benchmarks/pipeline.py --params benchmarks/fashion_mnist.yaml --smoke  # minutes

Copies the repository (tracked and new files, as a clone would have them) to
a temporary directory, starts nothing by hand, and runs every stage with
``dvc repro --single-item <stage>`` in order, timing each (the first one pays
for starting the local Prefect server, exactly as a user's first run does).
Then times a second ``dvc repro`` (which must run nothing) and collects
metrics/*.json. Writes benchmarks/results/pipeline_<source>_<device>.json.

``--params`` and ``--set`` change the copy's params.yaml before anything runs
(sections merged key by key, ``--set`` last) and are checked by the same
validation as every stage, so a wrong key fails at once, by name; the result
records the overrides and the whole effective params.yaml.

``--smoke`` checks that a recipe still runs end to end in a few minutes:
``SMOKE`` (100 images a class, 6 epochs of batch 64 a fit, one QAT epoch, latency
timed 20 times instead of 200 and 200 bootstrap resamples instead of 1,000; too
few steps to pass the baseline guard, hence ``allow_weak``) goes on top of
``--params``, before ``--set``, and the result is ``pipeline_<source>_<device>_smoke.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.machine import describe_machine, result_name, write_result  # noqa: E402
from benchmarks.workspace import copy_env, fresh_copy, git  # noqa: E402
from tasks.params import load_params  # noqa: E402
from tasks.servers import stop_local_server  # noqa: E402

STAGES = ("audit", "prepare", "resample", "train", "distill", "quantize", "evaluate")
# --smoke: every stage of any recipe, in minutes on 2 cores.
_FIT_SMOKE = {"epochs": 6, "batch_size": 64, "min_steps": 0, "allow_weak": True}
_DISTILL_SMOKE = {**_FIT_SMOKE, "bootstrap_samples": 200}
SMOKE: dict[str, Any] = {
    "data": {"max_per_class": 100},
    "train": _FIT_SMOKE,
    "distill": _DISTILL_SMOKE,
    "quantize": {"qat_epochs": 1, "qat_batch_size": 64},
    "evaluate": {"latency_warmup": 2, "latency_repeats": 20, "bootstrap_samples": 200},
}


def timed(repo: Path, env: dict[str, str], module: str, *args: str) -> tuple[float, str]:
    """``python -m module args`` in ``repo``: its seconds and output; a failure ends the run."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=repo, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout + result.stderr


def dvc(repo: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    return timed(repo, env, "dvc", *args)


def stages_ran(output: str) -> list[str]:
    """The stages a ``dvc repro``'s output says it ran, in order."""
    return re.findall(r"Running stage '(\w+)'", output)


def overrides_from(params_file: Path | None, assignments: list[str]) -> dict[str, Any]:
    """``{section: {key: value}}`` from an overrides file and ``SECTION.KEY=VALUE`` strings."""
    merged: dict[str, Any] = {}
    if params_file is not None:
        loaded = yaml.safe_load(params_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{params_file}: expected sections of params.yaml, got {loaded!r}")
        merged = {section: dict(values) if isinstance(values, dict) else values
                  for section, values in loaded.items()}  # fmt: skip
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set {assignment!r}: expected SECTION.KEY=VALUE (or KEY=VALUE)")
        value = yaml.safe_load(text)
        section, dot, key = name.partition(".")
        if dot:
            merged.setdefault(section, {})[key] = value
        else:
            merged[section] = value
    return merged


def merge_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``params`` (params.yaml as loaded) with ``overrides`` merged in, section by section."""
    merged = {section: dict(values) if isinstance(values, dict) else values
              for section, values in params.items()}  # fmt: skip
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def apply_overrides(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Write ``overrides`` into ``repo``'s params.yaml, validate it, return the result."""
    path = repo / "params.yaml"
    params = merge_overrides(yaml.safe_load(path.read_text()), overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        with contextlib.chdir(repo):  # relative paths in params are the repository's
            load_params(path.name)
    except ValueError as error:
        raise SystemExit(f"after the overrides, {error}") from None
    return params


class StageFailed(RuntimeError):
    """A stage exited non-zero: ``stage`` and the end of what it printed."""

    def __init__(self, stage: str, output: str) -> None:
        super().__init__(f"stage {stage} failed:\n{output}")
        self.stage = stage
        self.output = output


def images_per_second(
    metrics: dict[str, dict[str, Any]], stage_seconds: dict[str, float]
) -> dict[str, float]:
    """Throughput per stage: prepare's images decoded per second of the whole stage;
    train's and distill's training images per second of their fit loops (the mean
    over epochs, augmentation included; distill's is the taught student's, whose
    batches also run the teacher forward); evaluate's test images per second of the
    stage, counting each of the three variants once."""
    prepare, evaluate = metrics["prepare"], metrics["evaluate"]
    variants = [name for name in ("teacher", "student", "student_int8") if name in evaluate]
    return {
        "prepare": round(prepare["images"] / stage_seconds["prepare"], 1),
        "train": metrics["train"]["images_per_second"],
        "distill": metrics["distill"]["images_per_second"],
        "evaluate": round(len(variants) * prepare["test_size"] / stage_seconds["evaluate"], 1),
    }


def run_pipeline(
    overrides: dict[str, Any],
    setup: Callable[[Path], None] | None = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every stage in a fresh copy with ``overrides``, timed; then the no-op rerun.

    ``setup(repo)`` runs in the copy before the overrides are applied (to write
    a dataset into it, say). Raises ``StageFailed`` naming the stage that failed.
    Returns the per-stage times, the no-op rerun and every stage's metrics (with
    ``keep``, ``kept``: the copy's path, left for the caller to remove).
    """
    scratch = Path(tempfile.mkdtemp(prefix="visionpipe-bench-"))
    repo = fresh_copy(scratch / "repo", "benchmark copy")
    try:
        if setup is not None:
            setup(repo)
        if overrides:
            apply_overrides(repo, overrides)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "benchmark params", "--allow-empty")
        env = copy_env(scratch / "state")
        try:
            stage_seconds = {}
            for stage in STAGES:
                try:
                    seconds, output = dvc(repo, env, "repro", "--single-item", stage)
                except SystemExit as failed:
                    raise StageFailed(stage, str(failed)[-4000:]) from None
                assert f"Running stage '{stage}'" in output, output
                stage_seconds[stage] = round(seconds, 2)
                log(f"{stage:>9}: {seconds:6.1f} s")
            noop_seconds, output = dvc(repo, env, "repro")
            ran = stages_ran(output)
            log(f"second dvc repro: {noop_seconds:.1f} s, ran {ran or 'nothing'}")
        finally:
            stop_local_server(scratch / "state" / "prefect")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        metrics = {
            stage: json.loads((repo / "metrics" / f"{stage}.json").read_text()) for stage in STAGES
        }
    finally:
        if keep:
            log(f"kept {repo}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return {
        "data_source": params["data"]["source"],
        "images_per_second": images_per_second(metrics, stage_seconds),
        "overrides": overrides,
        "params": params,
        "stage_seconds": stage_seconds,
        "total_seconds": round(sum(stage_seconds.values()), 2),
        "noop_repro_seconds": round(noop_seconds, 2),
        "noop_repro_ran": ran,
        "metrics": metrics,
        **({"kept": str(repo)} if keep else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, help="a YAML file of params.yaml sections to change")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="change one key (YAML value), after --params; repeatable",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on top of --params: runs in minutes"
    )
    args = parser.parse_args()
    overrides = overrides_from(args.params, [])
    if args.smoke:
        overrides = merge_overrides(overrides, SMOKE)
    overrides = merge_overrides(overrides, overrides_from(None, args.assignments))
    try:
        run = run_pipeline(overrides, keep=args.keep, log=lambda line: print(line, flush=True))
    except StageFailed as failed:
        raise SystemExit(str(failed)) from None
    device = "gpu" if describe_machine()["gpu"] else "cpu"
    source = Path(run["data_source"]).name
    command = " ".join(["python", "benchmarks/pipeline.py", *map(shlex.quote, sys.argv[1:])])
    result = {"command": command, "machine": describe_machine(), **run}
    path = write_result(result_name(f"pipeline_{source}_{device}.json", args.smoke), result)
    print(f"total {result['total_seconds']:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
