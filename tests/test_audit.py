"""The data audit: near-duplicates, label errors, outliers, the grouped split, the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.audit import near_copy
from benchmarks.messy_folder import build as build_shapes
from tasks.data import audit as a
from tasks.data.gallery import render, suspects_table
from tasks.data.prepare import Decoded, group_ids, read_clusters, read_exclude, select
from tasks.data.sources import ArrayItems, Source
from tasks.data.splits import stratified_split
from tasks.params import load_params

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------- embeddings and hashes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> np.ndarray:
    """Forty 32 px RGB images of the suite's generated shapes, and near-copies of the first
    eight (cropped, resized, colour-shifted, JPEG), stored as prepare stores them."""
    root = tmp_path_factory.mktemp("shapes")
    build_shapes(root, seed=3, largest=4, smallest=4)
    files = sorted(p for p in root.rglob("*") if p.is_file())[:40]
    rng = np.random.default_rng(0)
    images = [Image.open(p).convert("RGB") for p in files]
    copies = [near_copy(image, rng).convert("RGB") for image in images[:8]]
    return np.stack([np.asarray(im.resize((32, 32))) for im in images + copies])


@pytest.fixture(scope="module")
def embedded(shapes) -> np.ndarray:
    return a.embed(lambda s, e: shapes[s:e], len(shapes), a.Embedder(3, 96), 16)  # auto at 32 px


def test_embeddings_are_unit_vectors_and_a_near_copy_is_its_originals_nearest(embedded):
    assert embedded.shape == (48, a.EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    sims = embedded @ embedded.T
    np.fill_diagonal(sims, -1)
    for k in range(8):
        assert sims[40 + k].argmax() == k


def test_the_perceptual_hash_barely_moves_for_a_copy_and_differs_between_images(shapes):
    hashes = a.perceptual_hash(shapes)
    copies = a.hamming(hashes[40:], hashes[:8])
    others = a.hamming(hashes[:40, None], hashes[None, :40])[np.triu_indices(40, 1)]
    assert np.median(copies) <= 8
    assert np.median(others) >= 20
    assert a.hamming(hashes[:1], hashes[:1])[0] == 0


def test_near_duplicates_with_the_defaults_are_planted_copies_and_nothing_else(shapes, embedded):
    audit = load_params(ROOT / "params.yaml").audit
    similarity, bits = audit.duplicate_similarity, audit.duplicate_hash_bits
    clusters = a.near_duplicates(embedded, a.perceptual_hash(shapes), similarity, bits)
    found = sorted(map(sorted, clusters.members))
    assert all(pair in [[k, 40 + k] for k in range(8)] for pair in found), found
    assert len(found) >= 7
    assert all(sim >= similarity and b <= bits for _, _, sim, b in clusters.pairs)


def test_near_duplicates_need_both_the_features_and_the_hash():
    features = np.eye(4, dtype=np.float32)[[0, 0, 0, 1]]  # items 0-2 identical features
    hashes = np.array([0, 0, 2**64 - 1, 0], dtype=np.uint64)  # item 2's hash is far
    clusters = a.near_duplicates(features, hashes, 0.99, 8)
    assert clusters.members == [[0, 1]]
    assert a.near_duplicates(features, hashes, 0.99, 64).members == [[0, 1, 2]]  # components
    assert a.near_duplicates(np.eye(3, dtype=np.float32), hashes[:3], 0.5, 64).members == []


# ------------------------------------------------------------------------- label errors


def _blobs(per_class: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(per_class), 16)) * 4
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return (centres[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32), labels


def test_label_issues_find_flipped_labels_out_of_sample():
    features, labels = _blobs((60, 60, 60, 60))
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(labels), 12, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 4, 12)) % 4
    issues = a.label_issues(features, noisy, 4, folds=5, seed=0)
    assert len(a.label_issues(features, noisy, 4, 5, 0, max_probability=0.05).positions) <= len(
        issues.positions
    )
    found = set(issues.positions.tolist())
    assert len(found & set(flipped.tolist())) >= 10
    assert len(found - set(flipped.tolist())) <= 2
    right = {int(p): int(s) for p, s in zip(issues.positions, issues.suggested, strict=True)}
    assert sum(right[p] == labels[p] for p in flipped if p in right) >= 10
    assert issues.checked == len(labels) and issues.skipped == {}
    assert np.all(np.diff(issues.given_confidence) >= 0)  # least confident first


def test_a_class_too_small_for_the_folds_is_skipped_and_named():
    features, labels = _blobs((30, 30, 3))
    issues = a.label_issues(features, labels, 3, folds=5, seed=0)
    assert issues.skipped == {2: "3 images, fewer than audit.cv_folds=5"}
    assert issues.checked == 60
    assert not set(issues.positions.tolist()) & set(np.flatnonzero(labels == 2).tolist())
    alone = a.label_issues(*_blobs((30, 3)), 2, folds=5, seed=0)
    assert alone.checked == 0 and set(alone.skipped) == {0, 1}


# --------------------------------------------------------------------- outliers, pixels


def test_the_far_image_is_the_outlier():
    features, _ = _blobs((50, 50))
    features = np.vstack([features, np.full((1, 16), 30.0)])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features[-1] = -features[:-1].mean(axis=0) / np.linalg.norm(features[:-1].mean(axis=0))
    scores = a.outlier_scores(features, k=5)
    assert scores.argmax() == len(features) - 1
    assert scores[-1] > 5 > np.sort(scores)[-2]


def test_pixel_flags():
    rng = np.random.default_rng(0)
    rows = rng.integers(60, 200, size=(4, 8, 8, 1), dtype=np.uint8)
    rows[1] = 128  # blank
    rows[2] = rng.integers(0, 6, size=(8, 8, 1))  # dark
    rows[3] = rng.integers(250, 256, size=(8, 8, 1))  # bright
    flags = a.pixel_flags(rows, blank_std=3.0, dark_mean=8, bright_mean=247)
    assert flags[0] is None
    assert [f[0] for f in flags[1:]] == ["blank", "too_dark", "too_bright"]


# ----------------------------------------------------------------- the grouped split


def test_a_grouped_split_keeps_every_group_in_one_split_and_stays_stratified():
    labels = np.repeat(np.arange(4), 50)
    groups = np.arange(200)
    for start in range(0, 200, 10):  # 20 groups of three: items start, start+1, start+2
        groups[start + 1 : start + 3] = start
    splits = stratified_split(labels, 0.15, 0.15, seed=0, groups=groups)
    split_of = np.empty(200, dtype=object)
    for name, indices in splits.items():
        split_of[indices] = name
    for g in np.unique(groups):
        assert len(set(split_of[groups == g])) == 1
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(200))
    for name, share in (("val", 0.15), ("test", 0.15)):
        counts = np.bincount(labels[splits[name]], minlength=4)
        assert np.all(np.abs(counts - 50 * share) <= 3), (name, counts)


def test_a_grouped_split_keeps_a_published_test_split_exactly():
    labels = np.tile(np.arange(2), 50)
    official = np.zeros(100, dtype=bool)
    official[80:] = True
    groups = np.arange(100)
    groups[[10, 12, 84]] = 10  # a cluster that the published split cuts across
    splits = stratified_split(labels, 0.2, 0.2, seed=0, official_test=official, groups=groups)
    assert splits["test"].tolist() == list(range(80, 100))
    assert (10 in splits["train"]) == (12 in splits["train"])


def test_group_ids_and_clusters_file(tmp_path):
    names = np.array(["a/1.png", "a/2.png", "b/3.png", "b/4.png"], dtype=object)
    ids = group_ids(names, [["a/1.png", "b/4.png", "gone.png"], ["x.png"]])
    assert ids[0] == ids[3] == 0 and len({ids[0], ids[1], ids[2]}) == 3
    source = Source("folder", ("a", "b"), np.array([0, 0, 1, 1]), ArrayItems(np.zeros(4)), names)
    path = tmp_path / "groups.json"
    with pytest.raises(FileNotFoundError, match=r"audit\.split_groups: false"):
        read_clusters(path, source)
    assert read_clusters(path, source, required=False) is None  # only reported then
    path.write_text(json.dumps({"source": "other", "items": 4, "clusters": []}))
    with pytest.raises(ValueError, match="run `dvc repro`"):
        read_clusters(path, source)
    assert read_clusters(path, source, required=False) is None
    path.write_text(json.dumps({"source": "folder", "items": 4, "clusters": [["a/1.png"]]}))
    assert read_clusters(path, source) == [["a/1.png"]]


def test_excluded_files_are_quarantined_by_name(tmp_path):
    listing = tmp_path / "exclude.txt"
    assert read_exclude(listing) == frozenset()
    listing.write_text("# a comment\n\na/2.png\n  b/3.png  \n")
    assert read_exclude(listing) == {"a/2.png", "b/3.png"}
    names = np.array([f"{c}/{i}.png" for c in "ab" for i in range(12)], dtype=object)
    source = Source("f", ("a", "b"), np.repeat([0, 1], 12), ArrayItems(np.zeros(24)), names)
    digests = np.array([bytes([i]) * 16 for i in range(24)], dtype="S16")
    decoded = Decoded(
        np.full(24, None, dtype=object), np.full(24, None, dtype=object), digests, {}, {}, 0
    )
    selection = select.fn(source, decoded, 5, frozenset({"a/2.png", "b/3.png", "b/99.png"}))
    assert len(selection.positions) == 22
    assert {q["path"]: q["reason"] for q in selection.quarantined} == {
        "a/2.png": "excluded",
        "b/3.png": "excluded",
    }


# ------------------------------------------------------------------- what the user reads


def _report() -> dict:
    rows = [
        {"path": "a/1.png", "kind": "near_duplicate", "score": 0.97, "class": "a", "cluster": 0},
        {"path": "a/1b.jpg", "kind": "near_duplicate", "score": 0.97, "class": "a", "cluster": 0},
        {"path": "b/7.png", "kind": "label_issue", "score": 0.91, "class": "b", "cluster": None,
         "suggested": "a", "given_probability": 0.09},
        {"path": "b/8.png", "kind": "blank", "score": 0.5, "class": "b", "cluster": None},
    ]  # fmt: skip
    counts = {"embedded": 10, "near_duplicate_clusters": 1, "near_duplicate_images": 2,
              "label_issues": 1, "outliers": 0, "blank": 1, "too_dark": 0,
              "too_bright": 0}  # fmt: skip
    return {"counts": counts, "flagged": rows, "label_issues_skipped": {"c": "2 images, ..."}}


def test_the_suspects_table_and_the_gallery_show_every_kind():
    report = _report()
    table = suspects_table(report, top=5)
    assert "1 near-duplicate clusters (2 images), 1 likely label errors" in table
    assert "label errors not checked in class c" in table
    assert "| label_issue | 0.91 | b | a |  | b/7.png |" in table
    assert "| near_duplicate | 0.97 | a |  | 0 | a/1b.jpg |" in table
    assert "b/8.png" in table and "b/7.png" not in suspects_table(report, 5, "blank")
    paths = ("a/1.png", "a/1b.jpg", "b/7.png", "b/8.png")
    pixels = {p: np.full((8, 8, 1), 9, dtype=np.uint8) for p in paths}
    page = render(report["counts"], report["flagged"], [["a/1.png", "a/1b.jpg"]], pixels.get, 10)
    assert page.count("<img") == 4 and page.count("data:image/png;base64,") == 4
    assert "cluster 0" in page and "b -&gt; a (p given 0.09)" in page
