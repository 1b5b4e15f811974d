"""Data-parallel training under ``torchrun``: who this process is, and how batches are shared.

    torchrun --nproc_per_node 2 -m flows.train      # or -m flows.distill

``torchrun`` starts N copies of the stage and sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; ``World.from_env`` reads them (one process without them). The
process group uses NCCL on GPUs and gloo on the CPU. Each rank trains on its
own shard of every global batch (``train.batch_size`` stays the *global*
batch, split evenly), DistributedDataParallel averages the gradients, and
only rank 0 runs the Prefect flow, writes checkpoints, metrics and MLflow
runs; the other ranks run the same fit as plain functions (``flows/train.py``).

torchrun starts each worker in a session of its own, so a SIGKILL of the
torchrun agent (an out-of-memory kill, say) does not reach them: left alone
they would train on as orphans and keep writing the resume state that a
re-run resumes from. ``init_process_group`` therefore asks the kernel to
SIGKILL the worker the moment its agent dies (Linux ``PR_SET_PDEATHSIG``),
and exits at once if the agent is already gone.

``ShardedSampler`` is the one sampler for every case: a permutation (or, with
``balanced_sampler`` weights, a weighted draw with replacement) seeded by
``seed + epoch``, cut into ``world`` interleaved shards. Rank r's k-th batch
is then exactly its share of the single-process run's k-th batch, so N
processes see the same global batches as one would.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_process_group(world: World, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not world.distributed:
        return device
    die_with_agent()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
AGENT_MARKS = ("torchrun", "torch.distributed.run", "torch/distributed/run.py")


def die_with_agent() -> None:
    """Have the kernel SIGKILL this worker when its parent, the torchrun agent, dies.

    The signal is armed for the parent this process has now; if that parent is
    no longer a torchrun agent (it died before the call, and this process was
    re-parented), the worker exits at once instead. A no-op off Linux or
    outside torchrun (no ``TORCHELASTIC_RUN_ID``).
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = psutil.Process().parent()
    try:
        command = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.Error:
        command = ""
    if not any(mark in command for mark in AGENT_MARKS):
        print(
            f"visionpipe: rank {os.environ.get('RANK', '?')}: its torchrun agent is gone; "
            "stopping before writing anything",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def local_batch_size(batch_size: int, world: World) -> int:
    if batch_size % world.size:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {world.size} processes: "
            "it is the global batch; make it a multiple of --nproc_per_node"
        )
    return batch_size // world.size


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity in one process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere, so every rank validates the same model."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class ShardedSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch order (``set_epoch`` before each epoch)."""

    def __init__(
        self, size: int, seed: int, world: World | None = None, weights: np.ndarray | None = None
    ) -> None:
        self.size = size
        self.seed = seed
        self.world = world or World()
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, True, generator=generator)
        usable = len(order) - len(order) % self.world.size
        return iter(order[self.world.rank : usable : self.world.size].tolist())

    def __len__(self) -> int:
        return self.size // self.world.size
