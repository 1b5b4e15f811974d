"""Progress for long loops: a tqdm bar on a terminal, a log line per tenth otherwise.

Under ``dvc repro`` in a terminal the bar redraws in place; in CI or a Prefect
worker (no terminal) the same loop logs ``decode: 40000/100000 (3120 img/s)``
lines instead of flooding the log with bar frames.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

MIN_GAP = 2.0  # seconds between log lines when there is no terminal


class Progress:
    def __init__(self, total: int, desc: str, log: Callable[[str], None], unit: str = "img"):
        self.total = total
        self.desc = desc
        self.log = log
        self.unit = unit
        self.done = 0
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False
        )
        self.step = max(total // 10, 1)
        self.next_log = self.step
        self.last_log = self.started

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if not self.bar.disable or self.done < self.next_log:
            return
        now = time.perf_counter()
        # A tenth of the way further, and not more often than every MIN_GAP seconds.
        if now - self.last_log >= MIN_GAP or self.done == self.total:
            self.log(f"{self.desc}: {self.done}/{self.total} ({self.rate:.0f} {self.unit}/s)")
            self.next_log = (self.done // self.step + 1) * self.step
            self.last_log = now

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
