"""A fresh copy of the repository, as a clone would hold it, for runs that must not touch yours.

Used by benchmarks/pipeline.py and the end-to-end test: tracked files plus
new, not-ignored ones (so uncommitted work is measured too), committed in a
new git repository so DVC and the MLflow ``git_commit`` tag see a real commit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=visionpipe", "-c", "user.email=visionpipe@localhost"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def fresh_copy(dest: Path, message: str = "fresh copy") -> Path:
    """Copy the repository's files to ``dest`` and commit them there; return ``dest``."""
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", message)
    return dest
