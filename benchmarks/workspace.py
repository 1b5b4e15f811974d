"""A fresh copy of the repository, as a clone would hold it, for runs that must not touch yours.

Used by the benchmarks that run stages and by the end-to-end tests:
``fresh_copy`` takes tracked files plus new, not-ignored ones (so uncommitted
work is measured too), committed in a new git repository so DVC and the MLflow
``git_commit`` tag see a real commit; ``copy_env`` is the environment its
stages run in, as a user's activated virtualenv would give them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def copy_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment for ``dvc``, ``visionpipe`` and stages run in a copy.

    This process's variables without any ``MLFLOW_``, ``PREFECT_`` or
    ``VISIONPIPE_`` setting (a copy never reports to the caller's servers),
    this interpreter's directory first on ``PATH`` (``python -m flows.<stage>``
    finds it, as in an activated virtualenv), ``VISIONPIPE_HOME=state`` (its
    own local Prefect server), Prefect's analytics off, then ``extra``.
    """
    ours = ("MLFLOW_", "PREFECT_", "VISIONPIPE_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VISIONPIPE_HOME"] = str(state)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env | extra
