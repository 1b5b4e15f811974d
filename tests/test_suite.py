"""benchmarks/suite.py's dataset and table: the generated messy folder and the report rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.messy_folder import CLASSES, build, class_sizes
from benchmarks.suite import parse_settings, summarise, table


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_the_messy_folder_is_long_tailed_varied_and_the_same_for_a_seed(tmp_path):
    assert class_sizes(10, 200, 16) == [200, 151, 114, 86, 65, 49, 37, 28, 21, 16]
    counts = build(tmp_path / "a", seed=3, largest=6, smallest=2)
    assert list(counts) == list(CLASSES) and counts["circle"] == 6 and counts["heart"] == 2
    again = build(tmp_path / "b", seed=3, largest=6, smallest=2)
    assert counts == again and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    images = [Image.open(p) for p in sorted((tmp_path / "a").rglob("*.*"))]
    assert {image.mode for image in images} == {"RGB"}
    assert {image.format for image in images} == {"PNG", "JPEG"}
    assert len({image.size for image in images}) > len(images) // 2  # sizes and aspect ratios vary


def test_a_refused_run_is_a_row_that_says_why():
    metrics = {
        "evaluate": {
            "teacher": {"f1_macro": 0.9, "accuracy": 0.91},
            "student": {"f1_macro": 0.8, "accuracy": 0.81},
            "student_int8": {
                "f1_macro": 0.79,
                "accuracy": 0.8,
                "size_bytes": 120_000,
                "targets": {
                    "int8_bytes": {"value": 120_000, "target": 1_000_000, "met": True},
                    "latency_ratio_b1_vs_teacher": {"value": 0.4, "target": 0.333, "met": False},
                    "size_ratio": {"value": 0.35, "target": 0.3, "met": False},
                },
            },
            "baselines": {"linear": {"f1_macro": 0.3, "accuracy": 0.4}},
        },
        "distill": {"kd_gain": 0.05, "params": 88394, "epochs_run": 20, "best_val_f1_macro": 0.85},
        "prepare": {"image_size": 32, "channels": 3},
        "train": {"epochs_run": 38, "best_val_f1_macro": 0.95},
    }
    ok = {"dataset": "messy-folder", "pretrained": True, "status": "ok", **summarise(metrics),
          "stage_seconds": {"train": 100.0, "distill": 20.0}}  # fmt: skip
    refused = {"dataset": "messy-folder", "pretrained": False, "status": "train failed",
               "reason": "WeakModelError: train: the best val macro-F1 0.08 ...",
               "wall_seconds": 80.0}  # fmt: skip
    assert (ok["teacher_val_f1_macro"], ok["student_val_f1_macro"]) == (0.95, 0.85)
    assert ok["student_int8_bytes"] == 120_000  # the student budget, as evaluate judged it
    assert {key: target["met"] for key, target in ok["student_budget"].items()} == {
        "int8_bytes": True, "latency_ratio_b1_vs_teacher": False,
    }  # fmt: skip
    rows = table([ok, refused]).splitlines()
    assert rows[2] == (
        "| messy-folder | pretrained | 0.900 | 0.800 | 0.790 | +0.110 | +0.050 | 0.300 | 120 |"
    )
    assert rows[3].startswith("| messy-folder | from scratch | train failed: WeakModelError")


def test_wesnoth_units_are_labelled_by_race_with_factions_merged(tmp_path):
    """The package's layout, in small: race folders, faction suffixes, nested unit folders."""
    from benchmarks.wesnoth_units import build

    units = tmp_path / "units"
    layout = {
        "human-loyalists": ["spearman.png", "spearman-attack-1.png", "cavalier/cavalier.png"],
        "human-magi": ["mage.png"],
        "undead-skeletal": ["skeleton.png", "skeleton-ne.png"],
        "trolls": ["whelp.png"],
    }
    for folder, names in layout.items():
        for name in names:
            (units / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGBA", (72, 72), (10, 20, 30, 0)).save(units / folder / name)
    (units / "random-dice.png").write_bytes(b"not a unit")  # outside every race folder

    counts = build(tmp_path / "out", units, min_per_class=2)
    assert counts == {"human": 4, "undead": 2}  # trolls has 1: left out
    names = sorted(p.name for p in (tmp_path / "out" / "human").iterdir())
    assert names == [
        "human-loyalists__cavalier__cavalier.png",
        "human-loyalists__spearman-attack-1.png",
        "human-loyalists__spearman.png",
        "human-magi__mage.png",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["human", "undead"]


def test_set_parses_yaml_values_per_section_and_rejects_a_bare_key():
    assert parse_settings(
        ["train.ema_half_life=2", "distill.alpha=0.5", "train.init_from=null"]
    ) == {
        "train": {"ema_half_life": 2, "init_from": None},
        "distill": {"alpha": 0.5},
    }
    with pytest.raises(SystemExit, match=r"SECTION\.KEY=VALUE"):
        parse_settings(["ema_half_life=2"])
