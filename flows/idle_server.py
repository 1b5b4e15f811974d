"""Run a local server until no stage has used it for a while, then stop it.

    python -m flows.idle_server --state DIR --idle SECONDS -- COMMAND...

``flows/prefect_api.py`` starts the local Prefect server through this wrapper:
it runs ``COMMAND`` as its child, in its own process group (which
``stop_server`` signals as a whole), and every few seconds looks at the
leases in ``DIR/leases/`` that running stages hold (``prefect_api.lease``).
Once no live process has held one for ``SECONDS`` (0: never) and ``DIR/keep``
(``visionpipe up``) is absent, it removes the server's record and stops the
server, under the same lock a stage takes to look it up, so a stage either
finds the server up and keeps it so with its lease, or finds no record and
starts a new one. A stage therefore never loses the server mid-run, and a
server left by a deleted checkout or an interrupted run does not outlive it
by more than the idle period.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.prefect_api import live_leases, locked, read_state


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m flows.idle_server --state DIR --idle S -- COMMAND...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="flows.idle_server")
    parser.add_argument("--state", required=True, help="the server's state folder")
    parser.add_argument("--idle", type=float, required=True, help="seconds unused (0: never)")
    parser.add_argument("--poll", type=float, default=None, help="seconds between looks")
    args = parser.parse_args(argv[:split])
    if not argv[split + 1 :]:
        raise SystemExit("flows.idle_server: no command after --")
    return args, argv[split + 1 :]


def _in_use(state: Path) -> bool:
    return (state / "keep").exists() or bool(live_leases(state))


def main(argv: list[str] | None = None) -> int:
    args, command = _parse(argv)
    state = Path(args.state)
    poll = args.poll or (min(5.0, max(args.idle / 4, 0.2)) if args.idle > 0 else 5.0)
    child = subprocess.Popen(command)
    # stop_server signals the whole group; a signal sent to this process alone
    # (a plain `kill`) is passed on, so the server never outlives its wrapper.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: child.send_signal(number))
    last_used = time.monotonic()
    while True:
        try:
            return child.wait(timeout=poll)
        except subprocess.TimeoutExpired:
            pass
        if args.idle <= 0 or _in_use(state):
            last_used = time.monotonic()
            continue
        if time.monotonic() - last_used < args.idle:
            continue
        with locked(state):
            if _in_use(state):  # a stage took a lease while this waited for the lock
                last_used = time.monotonic()
                continue
            record = read_state(state)
            if record is not None and int(record["pid"]) == os.getpid():
                (state / "server.json").unlink()
            print(
                f"visionpipe: no stage has used this server for {args.idle:g} s "
                "(VISIONPIPE_PREFECT_IDLE_S): stopping it",
                flush=True,
            )
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
