"""The teacher's outputs computed once per augmented view and reused (FKD: Shen & Xing, ECCV 2022).

With ``distill.teacher_views: K`` > 0, every train image has K fixed augmented
views. A view is regenerated from its number alone: before each image the
augmentation is re-seeded with ``view_seed(seed, view, row)``, so the view the
teacher saw when its logits were stored is the view the student sees in any
later epoch, in any DataLoader worker, after a resume. Epoch ``e`` shows row
``i`` its view ``(e + offset_i) mod K``, the offsets drawn once from the seed:
over K epochs every view once. A batch carries *view numbers*
(``view * rows + row``) in place of labels, which the objective maps back to
the stored teacher logits and the labels.

The teacher runs once over all K x rows views (K passes per image instead of
one per epoch), and the logits are kept in a ``TeacherViewCache`` on disk,
keyed by the teacher's weights, the train data, the exact augmentation
pipelines, the seed, K and the precision: a re-run of distill with another
student, temperature or schedule (``dvc exp run``) reads them instead of
running the teacher at all. The cache is bounded (``distill.teacher_view_cache_mb``;
least recently used entries go first), written atomically under a file lock (a
concurrent run waits and then reads; nobody reads half a file), and what it did
is recorded in ``metrics/distill.json`` (``teacher_views``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Dataset, Sampler

from tasks.artifacts import atomic_path
from tasks.data.datasets import Split, take_rows
from tasks.data.pixels import ChannelStats, normalise
from tasks.training.distributed import ShardedSampler
from tasks.training.resume import STATE_DIR_ENV
from tasks.training.transforms import Augment


def cache_dir() -> Path:
    """``$VISIONPIPE_HOME/cache/teacher-views`` when that is set, else per user,
    ``$XDG_CACHE_HOME/visionpipe/teacher-views`` (``~/.cache/...``): shared by the
    checkout, its ``dvc exp run --temp`` copies and queued experiments, as the key is
    all an entry depends on."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).resolve() / "cache" / "teacher-views"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).resolve() / "visionpipe" / "teacher-views"


def view_seed(seed: int, view: int, row: int) -> int:
    """The augmentation seed of ``row``'s view number ``view``: a function of the three alone."""
    return int(np.random.SeedSequence([seed, view, row]).generate_state(1)[0])


class ViewDataset(Dataset):
    """Every view of every row: index ``view * rows + row`` is row ``row`` augmented under
    ``view_seed(seed, view, row)``. Yields (normalised images, view numbers), or labels
    in place of view numbers when ``labels_out`` (the scratch student's batches)."""

    # Re-seeded per image from the view number: no random stream for a DataLoader
    # worker to seed or for a fit's resume state to save (``loaders.py``, ``resume.py``).
    augment = None

    def __init__(self, split: Split, stats: ChannelStats, augment: Augment, views: int,
                 seed: int, labels_out: bool = False) -> None:  # fmt: skip
        self.images = split.images
        self.labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
        self.stats, self.views, self.seed, self.labels_out = stats, views, seed, labels_out
        self.view_augment = augment
        self.rows = len(self.labels)

    def __len__(self) -> int:
        return self.views * self.rows

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        rows = (index % self.rows).numpy()
        views = (index // self.rows).tolist()
        images = take_rows(self.images, rows)
        out = []
        for image, view, row in zip(images, views, rows.tolist(), strict=True):
            self.view_augment.set_random_seed(view_seed(self.seed, view, row))
            out.append(self.view_augment(image, int(self.labels[row])))
        batch = torch.from_numpy(normalise(np.stack(out), self.stats))
        return batch, self.labels[torch.from_numpy(rows)] if self.labels_out else index


class ViewSampler(Sampler[int]):
    """``rows``' seeded per-epoch order (its share under torchrun), each row at this
    epoch's view of it: ``(epoch + offset[row]) % views``."""

    def __init__(self, rows: ShardedSampler, views: int, seed: int) -> None:
        self.row_sampler, self.views, self.size = rows, views, rows.size
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(views, (rows.size,), generator=generator)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.row_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for row in self.row_sampler:
            yield int((self.epoch + self.offsets[row]) % self.views) * self.size + row

    def __len__(self) -> int:
        return len(self.row_sampler)


def weights_digest(model: nn.Module) -> str:
    """A digest of a network's weights and buffers (what its outputs are a function of)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class TeacherViewCache:
    """Teacher logits on disk, one ``<key>.npy`` each, at most ``max_bytes`` in all."""

    directory: Path
    max_bytes: int

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The stored logits, or None when absent or not of ``shape`` (then rewritten)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            logits = np.load(path)
        except (OSError, ValueError):
            return None
        if logits.shape != shape:
            return None
        _touch(path)  # recently used: evicted last
        return logits

    def store(self, key: str, logits: np.ndarray) -> bool:
        """Write atomically, then evict the least recently used others down to the bound;
        False (nothing written) when this entry alone is over it."""
        if logits.nbytes > self.max_bytes:
            return False
        with atomic_path(self.path(key)) as tmp:
            with tmp.open("wb") as out:
                np.save(out, logits)
            _touch(tmp)
        entries = sorted(self.directory.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for old in entries:
            if total <= self.max_bytes:
                break
            if old.name != self.path(key).name:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)
        return True

    def lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f"{key}.lock")


def _touch(path: Path) -> None:
    """Mark ``path`` used now, to the nanosecond: the kernel's own file times are coarser
    (a clock tick), which would leave two entries written in one tick unordered."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def cached_teacher_logits(
    cache: TeacherViewCache, key: str, shape: tuple[int, int], compute: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """``compute()``'s logits through ``cache``: (logits, what happened, for the metrics)."""
    start = time.perf_counter()
    with cache.lock(key):
        logits = cache.load(key, shape)
        if logits is not None:
            status = "hit"
        else:
            logits = compute()
            status = "miss, stored" if cache.store(key, logits) else "miss, over the size bound"
    return logits, {
        "cache": status,
        "key": key,
        "bytes": int(logits.nbytes),
        "seconds": round(time.perf_counter() - start, 3),
    }
