"""Atomic outputs: a failed write leaves the old output, a killed run's temporaries are cleared."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.artifacts import atomic_dir, write_json
from tasks.data.images import ImageSpec
from tasks.data.prepare import staging_file


def test_atomic_dir_swaps_in_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    with atomic_dir(out) as tmp:
        write_json(tmp / "a.json", 1)
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        write_json(tmp / "b.json", 2)
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path: Path) -> None:
    # What SIGKILL leaves: an atomic_dir temporary and a prepare staging folder.
    (tmp_path / ".prepared.k1l2.tmp").mkdir()
    (tmp_path / ".prepared-staging.x9").mkdir()
    (tmp_path / ".prepared-staging.x9" / "images.npy").write_bytes(b"\0" * 64)
    (tmp_path / ".resampled.a1.tmp").mkdir()  # another output's: not ours to touch
    spec = ImageSpec(size=4, channels=1, resize="stretch", background=0, min_size=1)
    with staging_file(tmp_path / "prepared", 3, spec) as staging:
        assert staging.path.is_file()
        assert not (tmp_path / ".prepared-staging.x9").exists()
        with atomic_dir(tmp_path / "prepared") as tmp:
            write_json(tmp / "classes.json", ["a"])
        assert staging.path.is_file()  # atomic_dir leaves the live staging alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [".resampled.a1.tmp", "prepared"]


def test_outputs_get_ordinary_permissions_not_the_temporaries_owner_only_ones(
    tmp_path: Path,
) -> None:
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    write_json(tmp_path / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "out") as staging:
        (staging / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
