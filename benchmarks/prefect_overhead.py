"""What Prefect costs a stage: one process running a 6-task flow, three ways.

    python benchmarks/prefect_overhead.py [--repeats 3] [--tasks 6] [--smoke]

Each measurement is a fresh ``python`` process, like a DVC stage, running the
same ``--tasks`` trivial tasks:

- ``plain``: the task functions called directly (``.fn``), no Prefect at all;
- ``local-server``: a Prefect flow against a running local server, which is
  what ``dvc repro`` uses by default (flows/prefect_api.py);
- ``ephemeral``: a Prefect flow with no API configured, so Prefect starts its
  own temporary server inside the process.

Overhead = median(mode) - median(plain), the cost Prefect adds to every stage.
Writes benchmarks/results/prefect_overhead.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe_machine, result_name, write_result
from tasks.servers import start_local_server, stop_local_server

PROGRAM = """
import sys
from prefect import flow
from tasks.orchestration import stage_task

@stage_task(name="step")
def step(x: int) -> int:
    return x + 1

@flow(name="overhead")
def stage(n: int) -> int:
    x = 0
    for _ in range(n):
        x = step(x)
    return x

n, mode = int(sys.argv[1]), sys.argv[2]
if mode == "plain":
    x = 0
    for _ in range(n):
        x = step.fn(x)
else:
    stage(n)
"""


def time_process(mode: str, tasks: int, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tasks), mode],
        env=env, check=True, capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument(
        "--smoke", action="store_true",
        help="one process per mode, 2 tasks: does the script run? (prefect_overhead_smoke.json)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.tasks = 1, 2

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    base["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch) / "prefect"
        started = time.perf_counter()
        url = start_local_server(state)
        server_start_s = time.perf_counter() - started
        envs = {
            "plain": base,
            "local-server": {**base, "PREFECT_API_URL": url},
            "ephemeral": {**base, "PREFECT_HOME": str(Path(scratch) / "ephemeral-home")},
        }
        try:
            seconds = {
                mode: [time_process(mode, args.tasks, env) for _ in range(args.repeats)]
                for mode, env in envs.items()
            }
        finally:
            stop_local_server(state)

    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    result = {
        "command": f"python benchmarks/prefect_overhead.py --repeats {args.repeats} "
        f"--tasks {args.tasks}",
        "machine": describe_machine(),
        "tasks_per_flow": args.tasks,
        "process_seconds": seconds,
        "median_process_seconds": medians,
        "overhead_seconds_per_stage": {
            mode: medians[mode] - medians["plain"] for mode in ("local-server", "ephemeral")
        },
        "local_server_start_seconds": server_start_s,
    }
    path = write_result(result_name("prefect_overhead.json", args.smoke), result)
    for mode, value in medians.items():
        print(f"{mode:>13}: {value:6.2f} s per stage process (median of {args.repeats})")
    print(f"local server started once in {server_start_s:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
