"""Cached teacher views (FKD): fixed, regenerable views, their schedule, the cache, the fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.params import Params, ParamsError, parse_params
from tasks.training.distill import fit_student, teacher_view_logits
from tasks.training.distributed import ShardedSampler
from tasks.training.inputs import TrainingData, train_augment
from tasks.training.loaders import make_loader
from tasks.training.teacher_views import (
    TeacherViewCache,
    ViewSampler,
    cache_dir,
    cached_teacher_logits,
)
from tests.test_distill import _counting_teacher_rows, _data, _distill, _off, _teacher

VIEWS = 3


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path / "home"))


def _shifts(params: Params):
    """Strong, visible augmentation: every image is shifted and rotated differently."""
    return _off(params, affine_p=1.0, rotate_deg=30.0, translate_frac=0.25)


def _views(data: TrainingData, params: Params, **kwargs):
    augment = train_augment(data, _shifts(params), seed=5)
    return make_loader(data.train, data.prepared.stats, 4, seed=5, augment=augment,
                       views=VIEWS, **kwargs)  # fmt: skip


def test_a_view_is_the_same_image_whatever_batch_or_worker_asks_for_it(
    params: Params, tiny_prepared
) -> None:
    data = _data(tiny_prepared)
    dataset = _views(data, params).dataset
    rows = len(data.train)
    assert len(dataset) == VIEWS * rows
    first, numbers = dataset.__getitems__([0, rows + 0, 2 * rows + 5])
    assert numbers.tolist() == [0, rows, 2 * rows + 5]  # view numbers, not labels
    again, _ = dataset.__getitems__([2 * rows + 5, 7, rows + 0])
    torch.testing.assert_close(first[2], again[0])  # order and batch do not matter
    torch.testing.assert_close(first[1], again[2])
    assert not torch.equal(first[0], first[1])  # two views of row 0 differ
    labelled = _views(data, params, view_labels=True).dataset
    images, labels = labelled.__getitems__([rows + 3])
    torch.testing.assert_close(images[0], dataset.__getitems__([rows + 3])[0][0])
    assert labels.tolist() == [int(data.train.labels[3])]


def test_over_as_many_epochs_as_views_each_row_sees_each_view_once() -> None:
    rows = 10
    sampler = ViewSampler(ShardedSampler(rows, seed=1), VIEWS, seed=1)
    seen: dict[int, list[int]] = {row: [] for row in range(rows)}
    for epoch in range(1, VIEWS + 1):
        sampler.set_epoch(epoch)
        numbers = list(sampler)
        assert sorted(n % rows for n in numbers) == list(range(rows))  # every row once
        for number in numbers:
            seen[number % rows].append(number // rows)
    assert all(sorted(views) == list(range(VIEWS)) for views in seen.values())


def test_the_cache_is_bounded_atomic_and_checked_on_read(tmp_path) -> None:
    cache = TeacherViewCache(tmp_path, max_bytes=2 * (4 * 20 * 3 + 128))  # two .npy files
    logits = {key: np.full((20, 3), i, np.float32) for i, key in enumerate("abc")}
    for key in "ab":
        assert cache.store(key, logits[key])
    np.testing.assert_array_equal(cache.load("a", (20, 3)), logits["a"])  # a: just used
    assert cache.store("c", logits["c"])  # over the bound: b, the least recently used, goes
    assert sorted(p.stem for p in tmp_path.glob("*.npy")) == ["a", "c"]
    assert not list(tmp_path.glob("*.tmp"))
    assert cache.load("a", (21, 3)) is None  # another shape: another split, not these logits
    assert not cache.store("big", np.zeros((1000, 3), np.float32))  # alone over the bound
    (tmp_path / "d.npy").write_bytes(b"\x93NUMPY half")  # what a crash mid-write would leave
    assert cache.load("d", (20, 3)) is None


def test_a_miss_computes_and_stores_once_and_a_hit_reads(tmp_path) -> None:
    cache = TeacherViewCache(tmp_path, max_bytes=10**6)
    calls: list[int] = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.ones((4, 2), np.float32)

    first, record = cached_teacher_logits(cache, "k", (4, 2), compute)
    second, again = cached_teacher_logits(cache, "k", (4, 2), compute)
    assert len(calls) == 1 and (record["cache"], again["cache"]) == ("miss, stored", "hit")
    np.testing.assert_array_equal(first, second)


def test_the_cached_logits_are_the_teachers_on_each_view(params: Params, tiny_prepared) -> None:
    data = _data(tiny_prepared)
    distill = _distill(params, teacher_views=VIEWS)
    augment = train_augment(data, _shifts(params), seed=5)
    teacher = _teacher(tiny_prepared).build()
    logits, record = teacher_view_logits(teacher, data, distill, augment, 5, torch.device("cpu"))
    assert logits.shape == (VIEWS * len(data.train), data.prepared.num_classes)
    dataset = _views(data, params).dataset
    picks = [1, len(data.train) + 4, 2 * len(data.train) + 9]
    images, _ = dataset.__getitems__(picks)
    with torch.no_grad():
        direct = teacher(images).numpy()
    np.testing.assert_allclose(logits[picks], direct, rtol=1e-5, atol=1e-5)
    # Another augmentation, another key: never the first entry's logits.
    other = train_augment(data, _off(params, affine_p=1.0, rotate_deg=10.0), seed=5)
    _, second = teacher_view_logits(teacher, data, distill, other, 5, torch.device("cpu"))
    assert second["key"] != record["key"] and second["cache"] == "miss, stored"


def test_a_distill_on_cached_views_runs_the_teacher_once_per_view_then_never(
    params: Params, tiny_prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, teacher = _data(tiny_prepared), _teacher(tiny_prepared)
    distill = _distill(params, alpha=0.9, epochs=4, teacher_views=VIEWS)
    rows = _counting_teacher_rows(monkeypatch)
    first = fit_student.fn(data, teacher, distill, _shifts(params), seed=5, log=lambda _: None)
    assert sum(rows) == VIEWS * len(data.train)  # K passes per image, not one per epoch
    assert first.notes["teacher_passes_per_image"] == VIEWS
    assert first.notes["teacher_views"]["cache"] == "miss, stored"
    rows.clear()
    second = fit_student.fn(data, teacher, distill, _shifts(params), seed=5, log=lambda _: None)
    assert sum(rows) == 0 and second.notes["teacher_passes_per_image"] == 0
    assert second.notes["teacher_views"]["cache"] == "hit"
    for key, value in first.model.state_dict().items():  # the same logits: the same student
        torch.testing.assert_close(value, second.model.state_dict()[key])
    scratch = fit_student.fn(data, None, distill, _shifts(params), seed=5, log=lambda _: None)
    assert scratch.notes["teacher_passes_per_image"] == 0 and len(scratch.history) == 4


@pytest.mark.parametrize(
    ("clash", "value"),
    [("mixup", 0.5), ("feature_loss", "attention"), ("data_on_device", True)],
)
def test_cached_views_refuse_what_changes_the_view_after_the_teacher_saw_it(
    params: Params, clash: str, value
) -> None:
    raw = params.model_dump(mode="json")
    raw["distill"].update({"teacher_views": 4, clash: value})
    with pytest.raises(ParamsError, match=rf"distill\.teacher_views(.|\n)*distill\.{clash}"):
        parse_params(raw)


def test_the_cache_is_per_user_unless_visionpipe_home_says_otherwise(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cache_dir() == (tmp_path / "home" / "cache" / "teacher-views").resolve()
    monkeypatch.delenv("VISIONPIPE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # Not under the checkout: `dvc exp run --temp` copies and queued runs share it.
    assert cache_dir() == (tmp_path / "xdg" / "visionpipe" / "teacher-views").resolve()
