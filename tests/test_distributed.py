"""DDP under torchrun: two gloo processes on the CPU train like one process with the same batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tasks.training.distributed import ShardedSampler, World, local_batch_size

ROOT = Path(__file__).resolve().parents[1]


def _launch(out: Path, processes: int, *resume: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        sys.executable,
        *(launcher if processes > 1 else []),
        "-m",
        "tests.ddp_fit",
        str(out),
        *resume,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _fit(out: Path, processes: int, *resume: str) -> dict:
    done = _launch(out, processes, *resume)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.integration
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


@pytest.mark.integration
def test_two_killed_gloo_processes_resume_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    # dropout and per-rank augmentation on: each rank's own random streams must come back too
    state = tmp_path / "resume" / "train.pt"
    killed = _launch(tmp_path / "killed.json", 2, str(state), "3")
    assert killed.returncode != 0 and not (tmp_path / "killed.json").exists()
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], saved["world"], len(saved["rng"])) == (2, 2, 2)
    assert saved["rng"][0]["augment"] != saved["rng"][1]["augment"]  # one stream per rank

    resumed = _fit(tmp_path / "resumed.json", 2, str(state), "0")
    assert resumed["epochs"] == [1, 2, 3, 4]
    assert any("epoch 2 of 4 was finished, continuing at epoch 3" in m for m in resumed["logs"])
    assert not state.exists()

    whole = _fit(tmp_path / "whole.json", 2, str(tmp_path / "whole.pt"), "0")
    assert whole["logs"] == []
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["weights"] == whole["weights"]  # bit for bit
    for rank in (0, 1):  # and every rank ends with them, running statistics included
        ending = (tmp_path / f"resumed.json.rank{rank}").read_text()
        assert ending == (tmp_path / f"whole.json.rank{rank}").read_text()
        assert ending == (tmp_path / "whole.json.rank0").read_text()


@pytest.mark.integration
def test_workers_die_with_their_killed_agent_and_the_rerun_resumes(tmp_path: Path) -> None:
    # An out-of-memory kill of torchrun itself: its workers (each in a session of its
    # own) must not train on as orphans writing the resume state a re-run resumes from.
    state = tmp_path / "resume" / "train.pt"
    started = time.monotonic()
    killed = _launch(tmp_path / "killed.json", 2, str(state), "3", "agent")
    assert killed.returncode == -signal.SIGKILL
    pids = [int((tmp_path / f"killed.json.pid{rank}").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)], "a worker outlived its agent"
    # rank 0 sleeps 5 s after the kill where an orphan would go on: it died first
    assert time.monotonic() - started < 120
    assert not (tmp_path / "killed.json").exists()
    assert torch.load(state, weights_only=True)["epoch"] == 2  # epoch 3 was never saved

    resumed = _fit(tmp_path / "resumed.json", 2, str(state), "0")
    assert resumed["epochs"] == [1, 2, 3, 4]
    whole = _fit(tmp_path / "whole.json", 2, str(tmp_path / "whole.pt"), "0")
    assert resumed["weights"] == whole["weights"]  # bit for bit


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("weighted", [False, True])
def test_shards_of_two_ranks_make_up_the_single_process_batches(weighted: bool) -> None:
    weights = np.linspace(1.0, 3.0, 20) if weighted else None
    single = list(ShardedSampler(20, seed=4, weights=weights))
    shards = [list(ShardedSampler(20, 4, World(rank, 2), weights)) for rank in (0, 1)]
    # rank r's k-th batch of 3 is its share of the single process's k-th batch of 6
    for k in range(3):
        together = sorted(shards[0][3 * k : 3 * k + 3] + shards[1][3 * k : 3 * k + 3])
        assert together == sorted(single[6 * k : 6 * k + 6])
    sampler = ShardedSampler(20, seed=4)
    sampler.set_epoch(1)
    assert list(sampler) != single and sorted(sampler) == list(range(20))


def test_global_batch_must_split_evenly_over_the_ranks() -> None:
    assert local_batch_size(64, World(0, 4)) == 16
    with pytest.raises(ValueError, match="multiple of --nproc_per_node"):
        local_batch_size(64, World(0, 3))
