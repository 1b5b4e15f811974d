"""Prepare stage: decode, validate, convert, resize, de-duplicate, split; train statistics.

Run with ``dvc repro prepare`` (or ``python -m flows.prepare``). Reads the
``seed`` and ``data`` sections; writes ``data/prepared/`` (format in
``tasks/data/datasets.py``), ``metrics/prepare.json`` and ``reports/data_quality.json``.

The data flow is streamed, so memory stays bounded for any number of images:

1. list the source's items (``tasks/data/sources.py``), capped by ``data.max_per_class``;
2. decode them in worker processes (``tasks/data/images.py``), each writing its rows
   straight into a staging ``.npy`` file; only outcomes come back;
3. quarantine what did not decode, drop exact duplicates (by content hash) so
   that no image sits in two splits, and fail if a class is left too small;
4. split stratified (keeping a published test split), make the train split
   long-tailed if ``data.imbalance_ratio`` > 1;
5. copy each split's rows from staging into its own ``.npy`` in chunks, taking
   the train statistics on the way, and swap ``data/prepared/`` in whole.

Broken files never stop the run and never vanish: each is listed in
``reports/data_quality.json`` with its path and reason.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.artifacts import atomic_dir, remove_leftovers, write_json
from tasks.data.baselines import trivial_baselines, write_baselines
from tasks.data.datasets import SPLITS, NpyWriter, create_npy, load_prepared, write_description
from tasks.data.images import ArrayItems, ImageSpec, Outcome, decode_chunk
from tasks.data.pixels import ChannelStats, StatsAccumulator
from tasks.data.sources import Source, build_source, cap_per_class
from tasks.data.splits import SplitPlan, long_tail, stratified_split
from tasks.orchestration import stage_task
from tasks.params import BUILTIN_SOURCES, DataParams
from tasks.progress import Progress

CHUNK = 256  # items per worker task: large enough to amortise the hand-off
COPY_CHUNK = 2048  # rows per block when copying a split out of staging
RAW_DATA_DIR = Path("data/raw")  # dvc.yaml's prepare stage depends on this folder's content


def worker_count(workers: int | str) -> int:
    """``data.workers``: ``auto`` is every core this process may run on."""
    return len(os.sched_getaffinity(0)) if workers == "auto" else int(workers)


def content_versioned(source: str, root: Path | None = None) -> bool | None:
    """Whether DVC sees the source folder's content (it lies under data/raw/); None: built-in.

    ``root`` is the repository root (the working directory DVC runs stages in).
    """
    if source in BUILTIN_SOURCES:
        return None
    raw = ((root or Path.cwd()) / RAW_DATA_DIR).resolve()
    return raw in Path(source).resolve().parents


def read_exclude(path: Path) -> frozenset[str]:
    """The paths listed in ``audit.exclude`` (a missing file lists nothing); ``#`` comments."""
    if not path.is_file():
        return frozenset()
    lines = (line.strip() for line in path.read_text().splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


@stage_task(name="load-source")
def load_source(params: DataParams, seed: int) -> Source:
    return cap_per_class(build_source(params), params.max_per_class, seed)


@dataclass(frozen=True)
class Staging:
    """A ``.npy`` file with one row per source item, filled in by the decode workers."""

    path: Path
    offset: int  # byte offset of row 0


@contextmanager
def staging_file(beside: Path, rows: int, spec: ImageSpec) -> Iterator[Staging]:
    """A sparse staging array next to ``beside`` (same disk), removed whatever happens."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{beside.name}-staging."
    remove_leftovers(f"{prefix}*", beside.parent)  # a killed run's staging, up to GBs
    with tempfile.TemporaryDirectory(prefix=prefix, dir=beside.parent) as tmp:
        path = Path(tmp) / "images.npy"
        yield Staging(path, create_npy(path, (rows, spec.size, spec.size, spec.channels)))


@dataclass(frozen=True)
class Decoded:
    """Every item's outcome, column by column: a few MB for 100k items, and arrays
    that Prefect passes between tasks without walking them element by element."""

    reasons: np.ndarray  # object (N,): None where the item was stored, else the reason
    details: np.ndarray  # object (N,): what exactly went wrong
    digests: np.ndarray  # "S16" (N,): hash of the raw content
    conversions: dict[str, int]  # stored items per conversion kind
    formats: dict[str, int]  # stored items per file format
    converted: int  # stored items that needed any conversion

    @property
    def ok(self) -> np.ndarray:
        return np.equal(self.reasons, None)

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Decoded:
        stored = [o for o in outcomes if o.ok]
        return cls(
            reasons=np.asarray([o.reason for o in outcomes], dtype=object),
            details=np.asarray([o.detail for o in outcomes], dtype=object),
            digests=np.asarray([o.digest for o in outcomes], dtype="S16"),
            conversions=dict(sorted(Counter(k for o in stored for k in o.conversions).items())),
            formats=dict(sorted(Counter(o.format for o in stored).items())),
            converted=sum(1 for o in stored if o.conversions),
        )


@stage_task(name="decode")
def decode(
    source: Source,
    spec: ImageSpec,
    staging: Staging,
    workers: int,
    log: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> Decoded:
    """Decode every item into its staging row, ``workers`` processes at a time.

    Files with a ``timeout_s`` always decode in worker processes (one at the
    least), where each item's time can be limited: the stage's own thread
    cannot take the signal that interrupts a decoder.
    """
    n = len(source)
    outcomes: list[Outcome] = []
    starts = range(0, n, CHUNK)
    chunks = (source.items.take(np.arange(start, min(start + CHUNK, n))) for start in starts)
    args = (spec, str(staging.path), staging.offset, timeout_s)
    in_process = isinstance(source.items, ArrayItems) or not timeout_s
    with Progress(n, "decode", log) as progress:
        if in_process and (workers <= 1 or len(starts) < 2):
            for start, chunk in zip(starts, chunks, strict=True):
                outcomes += decode_chunk(chunk, start, *args)
                progress.update(len(chunk))
            return Decoded.of(outcomes)
        Image.init()  # import every Pillow plugin once, before the workers fork
        # fork, not spawn: a spawned worker re-imports the stage's __main__ and with
        # it Prefect (3.6 s and 240 MB each). The forked workers run only Pillow and
        # numpy code (tasks/data/images.py), which takes no lock the parent's threads hold.
        context = multiprocessing.get_context("fork")
        by_start: dict[int, list[Outcome]] = {}
        with ProcessPoolExecutor(min(workers, len(starts)), mp_context=context) as pool:
            futures = {
                pool.submit(decode_chunk, chunk, start, *args): start
                for start, chunk in zip(starts, chunks, strict=True)
            }
            for future in as_completed(futures):
                by_start[futures[future]] = future.result()
                progress.update(len(by_start[futures[future]]))
    return Decoded.of([outcome for start in starts for outcome in by_start[start]])


@dataclass(frozen=True)
class Selection:
    """Which staging rows go on to be split, and what was set aside and why."""

    positions: np.ndarray  # sorted staging rows that are kept
    quarantined: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)


@stage_task(name="select")
def select(
    source: Source, decoded: Decoded, min_per_class: int, excluded: frozenset[str] = frozenset()
) -> Selection:
    """Quarantine what failed or the user listed in ``audit.exclude`` (``excluded``), keep
    one copy of each exact duplicate, check class sizes.

    Copies of one content with different labels are all quarantined (the label
    is unknowable). Otherwise one copy is kept: the one in a published test split
    if there is one (so that split stays whole), else the first; so a duplicate
    can never sit in both train and test.
    """
    names, labels, classes = source.item_names, source.labels, source.classes
    keep = decoded.ok
    quarantined = [
        {"path": names[i], "reason": decoded.reasons[i], "detail": decoded.details[i]}
        for i in np.flatnonzero(~keep)
    ]
    listed = keep & np.isin(names, sorted(excluded))
    keep &= ~listed
    quarantined += [
        {"path": names[i], "reason": "excluded", "detail": "listed in audit.exclude"}
        for i in np.flatnonzero(listed)
    ]
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i in np.flatnonzero(keep):
        groups[decoded.digests[i]].append(int(i))
    duplicates = []
    for members in (m for m in groups.values() if len(m) > 1):
        if len({int(labels[m]) for m in members}) > 1:
            keep[members] = False
            for m in members:
                others = ", ".join(f"{names[o]} ({classes[labels[o]]})" for o in members if o != m)
                quarantined.append(
                    {
                        "path": names[m],
                        "reason": "conflicting_labels",
                        "detail": f"labelled {classes[labels[m]]}; same content as {others}",
                    }
                )
            continue
        official = source.official_test
        kept = next((m for m in members if official is not None and official[m]), members[0])
        dropped = [m for m in members if m != kept]
        keep[dropped] = False
        duplicates.append(
            {
                "class": classes[labels[kept]],
                "kept": names[kept],
                "dropped": [names[m] for m in dropped],
            }
        )

    counts = np.bincount(labels[keep], minlength=len(classes))
    short = np.flatnonzero(counts < min_per_class)
    if short.size:
        reasons: dict[int, Counter[str]] = defaultdict(Counter)
        for i in np.flatnonzero(~decoded.ok):
            reasons[int(labels[i])][decoded.reasons[i]] += 1
        detail = "; ".join(
            f"{classes[c]}: {counts[c]} usable"
            + (f" ({dict(reasons[c])} set aside)" if reasons[c] else "")
            for c in short
        )
        raise ValueError(
            f"class(es) with fewer than data.min_per_class={min_per_class} usable images: "
            f"{detail}. Add images, remove the class folder, or lower data.min_per_class."
        )
    return Selection(np.flatnonzero(keep), quarantined, duplicates)


def copy_splits(
    staging: Staging,
    plan: SplitPlan,
    labels: np.ndarray,
    names: np.ndarray,
    out_dir: Path,
    classes: tuple[str, ...],
    spec: ImageSpec,
    log: Callable[[str], None] = print,
) -> ChannelStats:
    """Write each split's rows from staging into ``out_dir`` in blocks, with each row's
    item name (``names.json``: which file went to which split); train statistics."""
    row_shape = np.load(staging.path, mmap_mode="r").shape[1:]
    accumulator = StatsAccumulator(row_shape[-1])
    total = sum(len(p) for p in plan.positions.values())
    with Progress(total, "write", log) as progress:
        for name in SPLITS:
            positions = plan.positions[name]
            with NpyWriter(out_dir / name / "images.npy", (len(positions), *row_shape)) as out:
                for start in range(0, len(positions), COPY_CHUNK):
                    # A fresh map per block: pages read from staging leave this
                    # process's resident set as soon as the block is copied.
                    rows = np.load(staging.path, mmap_mode="r")
                    block = rows[positions[start : start + COPY_CHUNK]]
                    del rows
                    out.append(block)
                    if name == "train":
                        accumulator.add(block)
                    progress.update(len(block))
            with NpyWriter(out_dir / name / "labels.npy", (len(positions),), np.int64) as out:
                out.append(labels[positions])
            write_json(out_dir / name / "names.json", [str(n) for n in names[positions]])
    stats = accumulator.result()
    write_description(out_dir, classes, stats, spec.preprocessing())
    return stats


@stage_task(name="write-prepared")
def write_prepared(
    out_dir: Path,
    staging: Staging,
    plan: SplitPlan,
    source: Source,
    spec: ImageSpec,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Swap the new prepared data in whole, or leave the old in place on any failure.

    The trivial baselines (``tasks/data/baselines.py``) are measured on the new splits
    before the swap, so ``baselines.json`` always describes the data beside it.
    Returns them.
    """
    with atomic_dir(out_dir) as tmp:
        copy_splits(staging, plan, source.labels, source.item_names, tmp, source.classes, spec, log)
        found = trivial_baselines(load_prepared(tmp), seed)
        write_baselines(tmp, found)
        return found


@stage_task(name="report")
def report(
    metrics_path: Path,
    quality_path: Path,
    source: Source,
    decoded: Decoded,
    selection: Selection,
    plan: SplitPlan,
    params: DataParams,
    spec: ImageSpec,
    baselines: dict[str, Any],
    grouping: dict[str, Any] | None = None,
) -> dict:
    """``reports/data_quality.json`` (everything set aside, and why) and the stage metrics:
    counts, the stored format (``auto`` resolved) and the trivial baselines' val and test scores."""
    num_classes = len(source.classes)
    counts = {
        name: np.bincount(source.labels[plan.positions[name]], minlength=num_classes).tolist()
        for name in SPLITS
    }
    reasons = Counter(entry["reason"] for entry in selection.quarantined)
    dropped = sum(len(group["dropped"]) for group in selection.duplicates)
    write_json(
        quality_path,
        {
            "source": source.name,
            "content_versioned": content_versioned(params.source),
            "items": len(source),
            "ignored": source.ignored,
            "symlinks_followed": source.symlinks,
            "quarantined_by_reason": dict(sorted(reasons.items())),
            "quarantined": selection.quarantined,
            "conversions": {
                "converted": decoded.converted,
                "unchanged": int(decoded.ok.sum()) - decoded.converted,
                "by_kind": decoded.conversions,
                "formats": decoded.formats,
            },
            "duplicates": {"dropped": dropped, "groups": selection.duplicates},
            "near_duplicates": grouping,
            "long_tail": {"ratio": params.imbalance_ratio, "dropped": plan.long_tail_dropped},
            "class_counts": {
                name: dict(zip(source.classes, counts[name], strict=True)) for name in SPLITS
            },
        },
    )
    metrics = {
        "images": int(sum(sum(c) for c in counts.values())),
        "quarantined": len(selection.quarantined),
        "duplicates": dropped,
        "num_classes": num_classes,
        **{f"{name}_size": int(sum(counts[name])) for name in SPLITS},
        "near_duplicate_clusters_together": grouping["kept_together"] if grouping else 0,
        "near_duplicate_clusters_across": len(grouping["across_splits"]) if grouping else 0,
        "train_imbalance": round(max(counts["train"]) / max(min(counts["train"]), 1), 3),
        "image_size": spec.size,
        "channels": spec.channels,
        "baselines": {
            name: {f"{split}_{key}": value for split in ("val", "test")
                   for key, value in baselines[name][split].items()}
            for name in ("majority", "linear")
        },
    }  # fmt: skip
    write_json(metrics_path, metrics)
    return metrics


def summary(metrics: dict, source: Source, selection: Selection, quality: Path) -> str:
    """The stage's one-line account of what happened."""
    reasons = Counter(entry["reason"] for entry in selection.quarantined)
    by_reason = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    set_aside = f"{metrics['quarantined']} quarantined" + (f" ({by_reason})" if by_reason else "")
    return (
        f"prepare: {metrics['images']} images of {source.name} ({metrics['num_classes']} "
        f"classes) -> train {metrics['train_size']} / val {metrics['val_size']} / test "
        f"{metrics['test_size']}; {set_aside}; {metrics['duplicates']} duplicates dropped; "
        f"near-duplicate clusters: {metrics['near_duplicate_clusters_together']} in one split, "
        f"{metrics['near_duplicate_clusters_across']} across splits; details in {quality}"
    )


@stage_task(name="split")
def split(
    source: Source,
    selection: Selection,
    params: DataParams,
    seed: int,
    clusters: list[list[str]] | None = None,
) -> SplitPlan:
    """Stratified split of the kept items; with ``clusters`` (lists of item names: the
    audit's near-duplicates) each cluster lands in a single split."""
    kept = selection.positions
    labels = source.labels[kept]
    official = None if source.official_test is None else source.official_test[kept]
    groups = None if clusters is None else group_ids(source.item_names[kept], clusters)
    indices = stratified_split(
        labels, params.val_fraction, params.test_fraction, seed, official, groups
    )
    train = long_tail(indices["train"], labels, params.imbalance_ratio, seed)
    positions = {name: kept[indices[name]] for name in SPLITS} | {"train": kept[train]}
    return SplitPlan(positions, len(indices["train"]) - len(train), groups is not None)


def group_ids(names: np.ndarray, clusters: list[list[str]]) -> np.ndarray:
    """int (N,): one id per cluster for its members among ``names``, a fresh id for the rest."""
    ids = np.arange(len(names)) + len(clusters)
    where = {str(name): i for i, name in enumerate(names)}
    for number, members in enumerate(clusters):
        for name in members:
            if name in where:  # an exact duplicate dropped, or a file excluded since
                ids[where[name]] = number
    return ids


def read_clusters(path: Path, source: Source, required: bool = True) -> list[list[str]] | None:
    """The audit stage's near-duplicate clusters (``data/audit/groups.json``) of ``source``.

    Not ``required`` (``audit.split_groups: false``: they are only reported), a
    missing or stale file is None instead of an error.
    """
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        if not required:
            return None
        raise FileNotFoundError(
            f"audit.split_groups is true but {path} does not exist: run `dvc repro` (the audit "
            "stage writes it), or set audit.split_groups: false"
        ) from None
    if found.get("source") != source.name or found.get("items") != len(source):
        if not required:
            return None
        raise ValueError(
            f"{path} describes {found.get('items')} items of {found.get('source')!r}, not the "
            f"{len(source)} of {source.name!r} being prepared: run `dvc repro` (audit first)"
        )
    return found["clusters"]


def clusters_by_split(plan: SplitPlan, names: np.ndarray, clusters: list[list[str]]) -> dict:
    """How the near-duplicate clusters fell: kept in one split, or across splits (listed)."""
    split_of = {
        str(names[p]): name for name, positions in plan.positions.items() for p in positions
    }
    across, together = [], 0
    for members in clusters:
        placed = {m: split_of[m] for m in members if m in split_of}
        if len(placed) < 2:
            continue
        if len(set(placed.values())) > 1:
            across.append(placed)
        else:
            together += 1
    return {"grouped": plan.grouped, "kept_together": together, "across_splits": across}
