"""What one ``visionpipe`` command imports, in a fresh interpreter (the light-command tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each costs from a few tenths of a second (scipy) to several seconds (torch, MLflow, Prefect).
HEAVY = ("torch", "onnxruntime", "onnx", "matplotlib", "mlflow", "prefect", "albumentations",
         "sklearn", "scipy")  # fmt: skip


def modules_loaded_by(tmp_path: Path, *argv: str) -> tuple[set[str], str]:
    """Every module ``visionpipe ARGV`` has loaded when it returns, and what it printed."""
    script = (
        "import json, sys\n"
        "from flows.cli import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    # a Prefect API nobody answers on, and an empty state folder: no server is found or started
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "VISIONPIPE_HOME": str(tmp_path / "home")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return set(json.loads(done.stderr.strip().splitlines()[-1])), done.stdout
