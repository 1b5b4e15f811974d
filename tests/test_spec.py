"""How images are stored: channels and size read off the files when params say auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.images import FileItems
from tasks.data.sources import Source
from tasks.data.spec import ImageShape, auto_size, image_spec
from tasks.params import Params
from tests.datasources import array_source, data_params
from tests.imagefolders import noise


def _file_source(paths: list[Path]) -> Source:
    return Source(
        name="folder",
        classes=("a",),
        labels=np.zeros(len(paths), dtype=np.int64),
        items=FileItems(np.asarray([str(p) for p in paths], dtype=object)),
        item_names=np.asarray([str(p) for p in paths], dtype=object),
    )


def test_auto_format_is_read_off_the_images(params: Params, tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, (size, mode) in enumerate([((40, 30), "L"), ((80, 100), "L"), ((27, 60), "LA")]):
        paths.append(tmp_path / f"gray{i}.png")
        Image.new(mode, size).save(paths[-1])
    grey_palette = Image.new("L", (50, 50)).convert("P")
    grey_palette.save(tmp_path / "palette.png")
    paths.append(tmp_path / "palette.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")  # skipped: quarantined later
    paths.append(tmp_path / "broken.png")
    auto = data_params(params, channels="auto", image_size="auto")
    spec = image_spec(auto, _file_source(paths))
    # median shorter side of 30, 80, 27, 50 is 40: a multiple of 4 within 16-32 -> 32
    assert (spec.channels, spec.size) == (1, 32)
    colour = tmp_path / "colour.jpg"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(colour)
    spec = image_spec(auto, _file_source([*paths, colour]))
    assert spec.channels == 3
    assert image_spec(data_params(params, channels=3, image_size=24)).size == 24
    with pytest.raises(ValueError, match="auto need the source"):
        image_spec(auto)


def test_auto_size_rounds_the_median_into_bounds() -> None:
    def shapes(*sides: int) -> list[ImageShape]:
        return [ImageShape(side, side + 5, True) for side in sides]

    assert auto_size(shapes(8, 8, 8)) == 16  # digits: raised to the floor
    assert auto_size(shapes(28, 28)) == 28  # Fashion-MNIST keeps its size
    assert auto_size(shapes(21, 21, 22)) == 20
    assert auto_size(shapes(300, 500, 640)) == 32  # photos: capped
    assert auto_size([]) == 16


def test_array_sources_say_their_own_format(params: Params) -> None:
    gray = array_source(noise((6, 28, 28), 0), [0, 1, 0, 1, 0, 1])
    auto = data_params(params, channels="auto", image_size="auto")
    assert (image_spec(auto, gray).channels, image_spec(auto, gray).size) == (1, 28)
    rgb = array_source(noise((6, 10, 10, 3), 0), [0, 1, 0, 1, 0, 1])
    assert (image_spec(auto, rgb).channels, image_spec(auto, rgb).size) == (3, 16)
