"""Atomic writes, so that no stage leaves a half-written output behind.

Every file a stage produces is written under a temporary name in the same
directory and moved into place with ``os.replace`` (atomic on POSIX); a
directory output is built beside its final path and swapped in whole.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only (0600/0700) entries; an output gets the
# permissions an ordinary open()/mkdir() would have given it, so that another
# user (a Prefect worker, a web server) can read what a stage wrote.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_leftovers(pattern: str, directory: Path) -> list[Path]:
    """Delete what a killed run left in ``directory`` under ``pattern``; return what went.

    A SIGKILL (or SIGTERM, which Python does not turn into an exception) skips
    every ``finally``; DVC runs one stage at a time per repository, so a
    temporary of the same output found at the start of a run is such a leftover.
    """
    removed = sorted(directory.glob(pattern)) if directory.is_dir() else []
    for stale in removed:
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    return removed


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(f".{path.name}.*.tmp", path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(_DIR_MODE)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """Save one array atomically in ``.npy`` format (loadable with ``mmap_mode='r'``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return Path(path)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write dict rows (all with the same keys) as CSV, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
