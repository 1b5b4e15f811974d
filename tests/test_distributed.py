"""DDP under torchrun: two gloo processes on the CPU train like one process with the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _fit(out: Path, processes: int) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        sys.executable,
        *(launcher if processes > 1 else []),
        "-m",
        "tests.ddp_fit",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_gloo_processes_match_single_process_training(tmp_path: Path) -> None:
    single = _fit(tmp_path / "single.json", 1)
    ddp = _fit(tmp_path / "ddp.json", 2)
    assert (single["world"], ddp["world"]) == (1, 2)
    # each rank takes half of every global batch of 16: the same number of steps
    assert ddp["batches_per_epoch"] == single["batches_per_epoch"] == 6
    # the same global batches and averaged gradients; only BatchNorm's batch
    # statistics differ (per rank on the CPU: SyncBatchNorm needs GPUs)
    np.testing.assert_allclose(ddp["train_loss"], single["train_loss"], rtol=0.05)
    assert abs(ddp["val_accuracy"][-1] - single["val_accuracy"][-1]) <= 2 / 32
    weights = [k for k in single["weights"] if "running" not in k]
    a = np.concatenate([single["weights"][k] for k in weights])
    b = np.concatenate([ddp["weights"][k] for k in weights])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.2
