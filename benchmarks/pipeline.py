"""The default pipeline from a fresh clone: wall time per stage, the no-op rerun, the results.

    python benchmarks/pipeline.py [--keep]

Copies the repository (tracked and new files, as a clone would have them) to
a temporary directory, starts nothing by hand, and runs every stage with
``dvc repro --single-item <stage>`` in order, timing each (the first one pays
for starting the local Prefect server, exactly as a user's first run does).
Then times a second ``dvc repro`` (which must run nothing) and collects
metrics/*.json. Writes benchmarks/results/pipeline_<source>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.machine import describe_machine, write_result  # noqa: E402
from benchmarks.workspace import fresh_copy  # noqa: E402
from flows.prefect_api import stop_local_server  # noqa: E402

STAGES = ("prepare", "resample", "train", "distill", "quantize", "evaluate")


def dvc(repo: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="visionpipe-bench-"))
    repo = fresh_copy(scratch / "repo", "benchmark copy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VISIONPIPE_HOME"] = str(scratch / "state")
    try:
        stage_seconds = {}
        for stage in STAGES:
            seconds, output = dvc(repo, env, "repro", "--single-item", stage)
            assert f"Running stage '{stage}'" in output, output
            stage_seconds[stage] = round(seconds, 2)
            print(f"{stage:>9}: {seconds:6.1f} s", flush=True)
        noop_seconds, output = dvc(repo, env, "repro")
        ran = re.findall(r"Running stage '(\w+)'", output)
        print(f"second dvc repro: {noop_seconds:.1f} s, ran {ran or 'nothing'}")
    finally:
        stop_local_server(scratch / "state" / "prefect")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = {
        stage: json.loads((repo / "metrics" / f"{stage}.json").read_text()) for stage in STAGES
    }
    device = "gpu" if describe_machine()["gpu"] else "cpu"
    source = Path(params["data"]["source"]).name
    result = {
        "command": "python benchmarks/pipeline.py",
        "machine": describe_machine(),
        "data_source": params["data"]["source"],
        "stage_seconds": stage_seconds,
        "total_seconds": round(sum(stage_seconds.values()), 2),
        "noop_repro_seconds": round(noop_seconds, 2),
        "noop_repro_ran": ran,
        "metrics": metrics,
    }
    path = write_result(f"pipeline_{source}_{device}.json", result)
    print(f"total {result['total_seconds']:.1f} s; wrote {path}")
    if args.keep:
        print(f"kept {repo}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
