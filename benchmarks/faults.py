"""Faults and hostile input, tried for real: what the pipeline did, how long it took, what was lost.

    python benchmarks/faults.py [--cases hostile-folder ...] [--out NAME] [--smoke]

Each case runs in its own fresh copy of the repository (``benchmarks/workspace.py``)
with its own server state folder, through the same commands a user types:

- ``hostile-folder``: the audit and prepare stages (``python -m flows.audit``,
  then ``python -m flows.prepare``) on an
  ImageFolder holding a FIFO, a socket, a directory symlink loop, symlinks out
  of the folder (to a PNG and to ``/dev/zero``), a link to another class's folder, a dangling and a
  self-referencing link, an empty and a truncated PNG, beside 30 good images;
- ``dvc-hashes-a-fifo``: ``dvc status`` with a FIFO in ``data/raw/`` (DVC, not
  visionpipe, opens every file of a dependency folder to hash it);
- ``adasyn-undefined``: ``dvc repro resample`` with ``resample.strategy: adasyn``
  on digits made long-tailed (rho 50), where ADASYN's density ratios are 0/0;
- ``exp-run-temp``: ``dvc exp run --temp prepare`` (DVC deletes the copy it ran
  in), then how many visionpipe servers are left, and after how long the
  shared one stops by itself (``VISIONPIPE_PREFECT_IDLE_S=10``);
- ``orphaned-server``: a Prefect server whose state folder was deleted under it
  (what temporary copies used to leave), found by ``visionpipe status`` and
  stopped by ``visionpipe down --all``.

Writes ``benchmarks/results/faults.json`` and prints the README's table.
``--smoke`` runs the two quickest cases (``hostile-folder``, ``orphaned-server``)
into ``faults_smoke.json``: does the script still run?
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.machine import describe_machine, write_result  # noqa: E402
from benchmarks.workspace import copy_env, fresh_copy, git  # noqa: E402
from tasks.servers import down_all, servers_on_machine, start_local_server  # noqa: E402

IDLE_S = 10


def _env(state: Path, idle: float) -> dict[str, str]:
    return copy_env(state, VISIONPIPE_PREFECT_IDLE_S=str(idle))


def _run(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, float, str]:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, time.perf_counter() - start, result.stdout + result.stderr


def _copy(base: Path, params: dict[str, dict[str, Any]]) -> Path:
    repo = fresh_copy(base / "repo")
    path = repo / "params.yaml"
    current = yaml.safe_load(path.read_text())
    for section, values in params.items():
        current[section].update(values)
    path.write_text(yaml.safe_dump(current, sort_keys=False))
    git(repo, "rm", "-q", "--cached", "dvc.lock")
    (repo / "dvc.lock").unlink()
    git(repo, "commit", "-qam", "fault case params, nothing run yet")
    return repo


def _servers(under: Path) -> list:
    return [s for s in servers_on_machine() if s.state.startswith(str(under))]


def _read(repo: Path, relative: str) -> dict[str, Any]:
    import json

    return json.loads((repo / relative).read_text())


def hostile_folder(base: Path) -> dict[str, Any]:
    root = base / "repo-data"
    good = 0
    for label in "abc":
        for i in range(10):
            (root / label).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(100 * ord(label) + i).integers(0, 256, (24, 24, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"good{i}.png")
            good += 1
    outside = base / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(outside / "secret.png")
    os.mkfifo(root / "a/fifo.png")
    (root / "a/loop").symlink_to("..")
    (root / "a/outside.png").symlink_to(outside / "secret.png")
    (root / "a/zero.png").symlink_to("/dev/zero")
    (root / "b/other_class").symlink_to("../c")
    (root / "b/dangling.png").symlink_to("missing.png")
    (root / "c/self.png").symlink_to("self.png")
    (root / "c/empty.png").write_bytes(b"")
    (root / "c/truncated.png").write_bytes((root / "c/good0.png").read_bytes()[:60])
    repo = _copy(base, {"data": {"source": "data/raw/hostile", "min_per_class": 5}})
    shutil.move(str(root), repo / "data/raw/hostile")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(repo / "data/raw/hostile/c/socket.png"))
    env = _env(base / "state", IDLE_S)
    try:
        # The stages themselves, audit then prepare, as `dvc repro` runs them: under DVC,
        # DVC hashes data/raw first and blocks on the FIFO before either starts (the
        # dvc-hashes-a-fifo case below).
        code, seconds, out = _run(repo, env, sys.executable, "-m", "flows.audit")
        if code == 0:
            code, prepare_seconds, out = _run(repo, env, sys.executable, "-m", "flows.prepare")
            seconds += prepare_seconds
    finally:
        sock.close()
    quality = _read(repo, "reports/data_quality.json") if code == 0 else {}
    stored = _read(repo, "metrics/prepare.json")["images"] if code == 0 else 0
    reasons: dict[str, int] = {}
    for entry in quality.get("quarantined", []):
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    return {
        "case": "hostile-folder",
        "exit": code,
        "seconds": round(seconds, 1),
        "did": f"quarantined {dict(sorted(reasons.items()))}; set aside {quality.get('ignored')}",
        "lost": "nothing" if stored == good else f"{good - stored} of {good} good images",
        "detail": out[-1500:] if code else "",
    }


def dvc_hashes_a_fifo(base: Path) -> dict[str, Any]:
    """Not visionpipe's code: DVC itself opens every file of a dependency folder to hash it."""
    repo = _copy(base, {})
    os.mkfifo(repo / "data/raw/fifo.png")
    try:
        code, seconds, _ = _run(repo, _env(base / "state", IDLE_S), "timeout", "30",
                                sys.executable, "-m", "dvc", "status", "prepare")  # fmt: skip
    finally:
        os.unlink(repo / "data/raw/fifo.png")
    blocked = code == 124
    return {
        "case": "dvc-hashes-a-fifo",
        "exit": code,
        "seconds": round(seconds, 1),
        "did": "`dvc status` blocked opening the FIFO in data/raw/ (killed after 30 s): "
        "remove FIFOs from data/raw/ before `dvc repro`"
        if blocked
        else "DVC did not block",
        "lost": "nothing (no stage ran)",
        "detail": "",
    }


def adasyn_undefined(base: Path) -> dict[str, Any]:
    params = {"data": {"imbalance_ratio": 50}, "resample": {"strategy": "adasyn"}}
    repo = _copy(base, params)
    code, seconds, out = _run(repo, _env(base / "state", IDLE_S), sys.executable, "-m", "dvc",
                              "repro", "resample")  # fmt: skip
    metrics = _read(repo, "metrics/resample.json") if code == 0 else {}
    return {
        "case": "adasyn-undefined",
        "exit": code,
        "seconds": round(seconds, 1),
        "did": f"strategy_used {metrics.get('strategy_used')}; warnings {metrics.get('warnings')}",
        "lost": "nothing" if code == 0 and metrics.get("synthetic", 0) > 0 else "the stage",
        "detail": out[-1500:] if code else "",
    }


def exp_run_temp(base: Path) -> dict[str, Any]:
    repo = _copy(base, {})
    state = base / "state"
    command = ("exp", "run", "--temp", "prepare", "-S", "data.val_fraction=0.2")
    code, seconds, out = _run(repo, _env(state, IDLE_S), sys.executable, "-m", "dvc", *command)
    left = _servers(base)
    in_copy = [s for s in left if ".dvc/tmp/exps" in s.state or ".dvc/tmp/exps" in s.cwd]
    start = time.monotonic()
    while _servers(base) and time.monotonic() - start < IDLE_S + 120:
        time.sleep(0.5)
    gone_after = time.monotonic() - start
    remaining = _servers(base)
    return {
        "case": "exp-run-temp",
        "exit": code,
        "seconds": round(seconds, 1),
        "did": f"{len(left)} server(s) after the run, {len(in_copy)} of them the deleted copy's; "
        f"the shared one stopped itself {gone_after:.0f} s later "
        f"(VISIONPIPE_PREFECT_IDLE_S={IDLE_S})",
        "lost": "nothing" if code == 0 and not remaining else f"{len(remaining)} server(s) left",
        "detail": out[-1500:] if code else "",
    }


def orphaned_server(base: Path) -> dict[str, Any]:
    gone = base / "deleted-copy" / ".visionpipe" / "prefect"
    os.environ["VISIONPIPE_PREFECT_IDLE_S"] = "0"  # never stops by itself: only down --all
    start_local_server(gone)
    shutil.rmtree(base / "deleted-copy")
    env = _env(base / "elsewhere", 0)
    _, _, status = _run(base, env, sys.executable, "-m", "flows.cli", "status")
    code, seconds, out = _run(base, env, sys.executable, "-m", "flows.cli", "down", "--all",
                              "--under", str(base))  # fmt: skip
    return {
        "case": "orphaned-server",
        "exit": code,
        "seconds": round(seconds, 1),
        "did": f"status: {'listed, checkout gone' if 'checkout gone' in status else 'NOT listed'}; "
        f"down --all: {out.strip().splitlines()[-1] if out.strip() else ''}",
        "lost": "nothing" if not _servers(base) else "the server is still up",
        "detail": "" if code == 0 else out[-1500:],
    }


CASES = (hostile_folder, dvc_hashes_a_fifo, adasyn_undefined, exp_run_temp, orphaned_server)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | exit | seconds | what the pipeline did | lost |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['case']} | {r['exit']} | {r['seconds']} | {r['did']} | {r['lost']} |" for r in rows
    ]
    return "\n".join(lines)


SMOKE = ("hostile-folder", "orphaned-server")


def main() -> None:
    names = {case.__name__.replace("_", "-"): case for case in CASES}
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=list(names), default=list(names),
                        help="which faults to try (default: all)")  # fmt: skip
    parser.add_argument("--out", default=None, help="result file name (faults.json)")
    parser.add_argument("--smoke", action="store_true", help=f"only {' and '.join(SMOKE)}")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.out = list(SMOKE), args.out or "faults_smoke.json"
    rows = []
    for case in (names[name] for name in args.cases):
        with tempfile.TemporaryDirectory(prefix="visionpipe-fault-") as tmp:
            print(f"{case.__name__}...", flush=True)
            try:
                rows.append(case(Path(tmp)))
            finally:
                # A server a case's stage started would wait out its idle time, and its
                # watcher gives up on a deleted state folder: stop it before deleting.
                down_all(Path(tmp), force=True)
            print(f"  -> exit {rows[-1]['exit']} in {rows[-1]['seconds']} s", flush=True)
    command = " ".join(["python benchmarks/faults.py", *sys.argv[1:]])
    path = write_result(
        args.out or "faults.json",
        {"command": command, "machine": describe_machine(), "cases": rows},
    )
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
