"""A real colour ImageFolder: Battle for Wesnoth's unit sprites, one class per race.

    python benchmarks/wesnoth_units.py OUT_DIR [--units DIR] [--min-per-class 100]

The images are the game's own artwork, from Debian's ``wesnoth-1.16-data``
package (GPL-2+): 72 x 72 RGBA sprites with transparent backgrounds, kept at
their native size and format. The labels are the package's own structure: each
sub-folder of ``data/core/images/units/`` is a race or faction (``drakes``,
``dwarves``, ``undead-skeletal``...), with the faction suffix dropped, so
``human-loyalists``, ``human-magi`` and the other human folders are one
``human`` class and the three undead folders one ``undead``.

Every sprite of a unit is taken, its animation frames and facings too
(``spearman.png``, ``spearman-attack-2.png``, ``spearman-ne.png``...): the stills
alone are about 330 images, too few for eight classes. Frames of one unit are
alike, and prepare's split is by image, not by unit, so one unit's frames land
in train and in test: the test score says how well a model knows these units,
and is optimistic for a unit it has never seen. It is a fair comparison of the
teacher, the student and the int8 student, which all see the same split. Races
with fewer than ``--min-per-class`` sprites are left out: with the package's
1.16.9 data, 11 classes and 5,515 images, from human (1,170) to goblins
(104); the suite caps them with ``data.max_per_class``. The classes are kinds of
creature drawn by many artists, not one style per class.

Where the images come from, first that is found: ``--units DIR``; the installed
package (``/usr/share/games/wesnoth/1.16/data/core/images/units``); else
``apt-get download wesnoth-1.16-data`` (no root needed, 146 MB) unpacked with
``dpkg-deb -x`` into ``~/.cache/visionpipe/wesnoth``, once.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

PACKAGE = "wesnoth-1.16-data"
UNITS = Path("usr/share/games/wesnoth/1.16/data/core/images/units")
CACHE = Path.home() / ".cache" / "visionpipe" / "wesnoth"


def find_units(units: Path | None = None) -> Path:
    """The ``units`` image folder: ``units``, the installed package, or a cached download."""
    for candidate in (units, Path("/") / UNITS, CACHE / UNITS):
        if candidate is not None and candidate.is_dir():
            return candidate
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(
            f"no Wesnoth unit sprites: pass --units DIR, or install {PACKAGE} "
            "(Debian/Ubuntu: apt-get install wesnoth-1.16-data)"
        )
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=scratch, check=True)
        (deb,) = Path(scratch).glob("*.deb")
        unpacked = Path(scratch) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        target = CACHE / UNITS
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked / UNITS), str(target))  # whole, or not at all
    return CACHE / UNITS


def sprites(units: Path) -> dict[str, list[Path]]:
    """Race -> every sprite under its folders (``human-loyalists/spearman.png`` is ``human``)."""
    by_race: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(units.glob("*/**/*.png")):
        by_race[path.relative_to(units).parts[0].split("-")[0]].append(path)
    return dict(by_race)


def build(out: Path, units: Path | None = None, min_per_class: int = 100) -> dict[str, int]:
    """Copy the sprites of every race with at least ``min_per_class`` of them to ``out/<race>/``.

    File names keep the source's sub-folders (``human-magi__red-mage.png``), so names
    from different factions of one race never collide. Returns images per class.
    """
    source = find_units(units)
    counts = {}
    for race, paths in sprites(source).items():
        if len(paths) < min_per_class:
            continue
        (out / race).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy2(path, out / race / "__".join(path.relative_to(source).parts))
        counts[race] = len(paths)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--units", type=Path, help="Wesnoth's data/core/images/units folder")
    parser.add_argument("--min-per-class", type=int, default=100)
    args = parser.parse_args()
    counts = build(args.out, args.units, args.min_per_class)
    print(f"{sum(counts.values())} images in {len(counts)} classes under {args.out}: {counts}")


if __name__ == "__main__":
    main()
