"""Prepare stage cores: image conversion, sources, stratified splits and train statistics."""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.datasets import ChannelStats
from tasks.params import DataParams, Params
from tasks.prepare import convert, stratified_split, to_array
from tasks.sources import FASHION_MNIST_CLASSES, Source, build_source, read_idx

# ---------------------------------------------------------------- to_array


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


IMAGES: dict[str, Callable[[], Image.Image]] = {
    "RGBA": lambda: Image.fromarray(_noise((7, 5, 4)), "RGBA"),
    "P": lambda: Image.fromarray(_noise((9, 13, 3))).convert("P"),
    "L": lambda: Image.fromarray(_noise((11, 3))),
    "RGB": lambda: Image.fromarray(_noise((3, 17, 3))),
    "CMYK": lambda: Image.fromarray(_noise((6, 9, 4)), "CMYK"),
    "LA": lambda: Image.fromarray(_noise((5, 5, 2)), "LA"),
}


@pytest.mark.parametrize("mode", IMAGES)
@pytest.mark.parametrize("channels", [1, 3])
def test_to_array_shape_and_dtype(mode: str, channels: int) -> None:
    image = IMAGES[mode]()
    assert image.mode == mode
    array = to_array(image, channels, 8)
    assert array.shape == (8, 8, channels)
    assert array.dtype == np.uint8


def test_to_array_colour_conversion() -> None:
    red = Image.new("RGB", (3, 5), (255, 0, 0))
    assert to_array(red, 3, 4)[0, 0].tolist() == [255, 0, 0]
    assert to_array(red, 1, 4)[0, 0, 0] == 76  # ITU-R 601 luma: 0.299 * 255
    # CMYK is subtractive: no ink is white, full black ink is black.
    assert to_array(Image.new("CMYK", (3, 3), (0, 0, 0, 0)), 1, 3).min() == 255
    assert to_array(Image.new("CMYK", (3, 3), (0, 0, 0, 255)), 3, 3).max() == 0


def _half_transparent_rgba() -> Image.Image:
    """Left column fully transparent (its colour must not show), right column opaque black."""
    pixels = np.zeros((4, 2, 4), np.uint8)
    pixels[:, 0] = (10, 200, 30, 0)
    pixels[:, 1] = (0, 0, 0, 255)
    return Image.fromarray(pixels, "RGBA")


@pytest.mark.parametrize("channels", [1, 3])
def test_alpha_is_composited_on_white(channels: int) -> None:
    array = to_array(_half_transparent_rgba(), channels, 2)  # no resize: (2, 2) kept as is
    assert (array[:, 0] == 255).all()
    assert (array[:, 1] == 0).all()


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0] * 256)  # every entry black
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=1)
    reloaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert reloaded.mode == "P"
    assert to_array(reloaded, 1, 4).min() == 255


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((4, 4), np.uint8)
    pixels[:, 2:] = 255  # left dark, right bright
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180 to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    array = to_array(Image.open(io.BytesIO(buffer.getvalue())), 1, 4)[..., 0]
    assert (array[:, :2] == 255).all()
    assert (array[:, 2:] == 0).all()


def test_colour_key_transparency_is_composited_on_white() -> None:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 0).save(buffer, format="PNG", transparency=0)
    reloaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert "transparency" in reloaded.info
    assert to_array(reloaded, 1, 4).min() == 255


def test_sixteen_bit_grayscale_is_rescaled() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)).save(buffer, format="PNG")
    array = to_array(Image.open(io.BytesIO(buffer.getvalue())), 1, 4)
    assert np.abs(array.astype(int) - 100).max() <= 1


# ---------------------------------------------------------------- stratified_split


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


@pytest.mark.parametrize("counts", [[40, 25, 12], [9, 31, 17, 50, 8], [100, 100]])
@pytest.mark.parametrize("seed", [0, 7])
def test_split_disjoint_complete_and_stratified(counts: list[int], seed: int) -> None:
    labels = _labels(counts, seed)
    splits = stratified_split(labels, val_fraction=0.15, test_fraction=0.2, seed=seed)
    everything = np.concatenate(list(splits.values()))
    assert len(everything) == len(labels)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    for name, fraction in (("val", 0.15), ("test", 0.2)):
        per_class = np.bincount(labels[splits[name]], minlength=len(counts))
        assert np.abs(per_class - fraction * np.asarray(counts)).max() <= 1.0, name


def test_split_is_deterministic_for_a_seed() -> None:
    labels = _labels([40, 25, 12])
    first = stratified_split(labels, 0.15, 0.15, seed=3)
    again = stratified_split(labels, 0.15, 0.15, seed=3)
    other = stratified_split(labels, 0.15, 0.15, seed=4)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])


def test_split_keeps_official_test_exactly() -> None:
    labels = _labels([30, 30, 20])
    official = np.zeros(len(labels), dtype=bool)
    official[::5] = True
    splits = stratified_split(labels, 0.15, 0.4, seed=0, official_test=official)
    assert np.array_equal(splits["test"], np.flatnonzero(official))
    rest = np.concatenate([splits["train"], splits["val"]])
    assert np.array_equal(np.sort(rest), np.flatnonzero(~official))
    assert not np.intersect1d(splits["train"], splits["val"]).size


def test_split_class_too_small_is_a_clear_error() -> None:
    labels = _labels([1, 20, 20])
    with pytest.raises(ValueError, match="smallest class has 1 images") as info:
        stratified_split(labels, 0.15, 0.15, seed=0)
    assert "data.val_fraction=0.15" in str(info.value)


def test_split_refuses_to_leave_a_class_out_of_a_split() -> None:
    # 2 images cannot cover train, val and test: a silent gap would score that class 0.
    with pytest.raises(ValueError, match=r"class\(es\) \[0\] \(with \[2\] images\)"):
        stratified_split(_labels([2, 10, 10]), 0.15, 0.15, seed=0)


# ---------------------------------------------------------------- ChannelStats


def test_channel_stats_match_numpy() -> None:
    images = _noise((50, 4, 4, 3))
    scaled = images / 255.0
    for chunk in (7, 4096):  # several chunks and one
        stats = ChannelStats.of(images, chunk=chunk)
        np.testing.assert_allclose(stats.mean, scaled.mean(axis=(0, 1, 2)), atol=1e-12)
        np.testing.assert_allclose(stats.std, scaled.std(axis=(0, 1, 2)), atol=1e-9)


def test_constant_channel_gets_unit_std() -> None:
    images = _noise((10, 4, 4, 2))
    images[..., 1] = 77
    stats = ChannelStats.of(images)
    assert stats.std[1] == 1.0
    assert stats.mean[1] == pytest.approx(77 / 255)
    assert stats.std[0] != 1.0


# ---------------------------------------------------------------- sources


def _data_params(params: Params, **update: object) -> DataParams:
    return DataParams(**{**params.data.model_dump(), **update})


def test_digits_source(params: Params) -> None:
    source = build_source(_data_params(params, source="digits"))
    assert len(source) == 1797
    assert source.classes == tuple(str(i) for i in range(10))
    assert np.bincount(source.labels).size == 10
    assert source.official_test is None
    first = source.load(0)
    assert first.size == (8, 8)
    # digits' 0..16 intensities are spread over the uint8 range
    assert max(np.asarray(source.load(i)).max() for i in range(20)) == 255


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = _noise((3, 4, 5))
    labels = np.array([0, 9, 4], np.uint8)
    assert np.array_equal(read_idx(_write_idx(tmp_path / name, images)), images)
    assert np.array_equal(read_idx(_write_idx(tmp_path / f"labels{name[6:]}", labels)), labels)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "float.idx"
    path.write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 2) + b"\x00" * 8)  # 0x0D: float32
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match="header promises"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.idx"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 3) + b"\x00\x00")  # 3 dims promised, 0.5 given
    with pytest.raises(ValueError):
        read_idx(path)


def test_fashion_mnist_missing_files_say_how_to_install(params: Params, tmp_path: Path) -> None:
    data = _data_params(params, source="fashion-mnist", fashion_mnist_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_source(data)


def test_fashion_mnist_reads_idx_and_marks_official_test(params: Params, tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", _noise((3, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2], np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", _noise((2, 28, 28), seed=1))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 8], np.uint8))
    source = build_source(_data_params(params, source="fashion-mnist", fashion_mnist_dir=tmp_path))
    assert source.classes == FASHION_MNIST_CLASSES
    assert source.labels.tolist() == [0, 1, 2, 9, 8]
    assert source.official_test.tolist() == [False, False, False, True, True]
    assert np.array_equal(np.asarray(source.load(3)), _noise((2, 28, 28), seed=1)[0])


def _save(path: Path, colour: tuple[int, int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 12), colour).save(path, format=fmt)
    return path


def test_image_folder_source(params: Params, tmp_path: Path) -> None:
    kept = {
        _save(tmp_path / "cat" / "a.png", (200, 0, 0)): 0,
        _save(tmp_path / "cat" / "sub" / "b.JPG", (0, 200, 0), "JPEG"): 0,
        _save(tmp_path / "dog" / "c.jpeg", (0, 0, 200), "JPEG"): 1,
    }
    _save(tmp_path / ".ipynb_checkpoints" / "hidden-class.png", (1, 1, 1))
    _save(tmp_path / "dog" / ".ipynb_checkpoints" / "c-checkpoint.png", (1, 1, 1))
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    source = build_source(_data_params(params, source=str(tmp_path)))
    assert source.classes == ("cat", "dog")
    assert dict(zip(source.item_names, source.labels.tolist(), strict=True)) == {
        str(path): label for path, label in kept.items()
    }
    dominant = {"a.png": 0, "b.JPG": 1, "c.jpeg": 2}  # red, green, blue
    for i, name in enumerate(source.item_names):
        pixel = source.load(i).convert("RGB").getpixel((5, 5))
        assert int(np.argmax(pixel)) == dominant[Path(name).name]


def test_image_folder_without_class_folders(params: Params, tmp_path: Path) -> None:
    _save(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_source(_data_params(params, source=str(tmp_path)))


# ---------------------------------------------------------------- convert (quarantine)


def _truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(_noise((64, 64, 3))).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    return path


def test_convert_quarantines_undecodable_items(params: Params, tmp_path: Path) -> None:
    _save(tmp_path / "a" / "good.png", (255, 255, 255))
    _save(tmp_path / "b" / "good.jpg", (0, 0, 0), "JPEG")
    bad = {
        (tmp_path / "a" / "empty.png"): b"",
        (tmp_path / "b" / "garbage.jpg"): b"this is not a JPEG",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    truncated = _truncated_png(tmp_path / "b" / "truncated.png")
    data = _data_params(params, source=str(tmp_path), image_size=8, channels=1)

    converted = convert.fn(build_source(data), data)

    assert converted.images.shape == (2, 8, 8, 1)
    assert converted.images.dtype == np.uint8
    assert converted.labels.tolist() == [0, 1]
    assert converted.images[0].min() == 255  # the white one, from class a
    assert converted.images[1].max() <= 5  # the black JPEG, from class b
    assert converted.official_test is None
    reasons = {entry["path"]: entry["reason"] for entry in converted.quarantined}
    assert set(reasons) == {str(path) for path in bad} | {str(truncated)}
    assert "UnidentifiedImageError" in reasons[str(tmp_path / "a" / "empty.png")]
    assert all(reason for reason in reasons.values())


def _in_memory_source(loaders: list[Callable[[], Image.Image]], official: list[bool]) -> Source:
    return Source(
        name="memory",
        classes=("x", "y"),
        labels=np.arange(len(loaders), dtype=np.int64) % 2,
        load=lambda i: loaders[i](),
        item_names=[f"memory[{i}]" for i in range(len(loaders))],
        official_test=np.asarray(official),
    )


def test_convert_keeps_official_test_aligned(params: Params) -> None:
    def broken() -> Image.Image:
        return Image.open(io.BytesIO(b"garbage"))

    def grey(value: int) -> Callable[[], Image.Image]:
        return lambda: Image.new("L", (3, 3), value)

    source = _in_memory_source(
        [grey(10), broken, grey(30), grey(40)], official=[False, True, False, True]
    )
    data = _data_params(params, image_size=4, channels=3)
    converted = convert.fn(source, data)
    assert converted.images.shape == (3, 4, 4, 3)
    assert converted.images[:, 0, 0, 0].tolist() == [10, 30, 40]
    assert converted.labels.tolist() == [0, 0, 1]
    assert converted.official_test.tolist() == [False, False, True]
    assert [entry["path"] for entry in converted.quarantined] == ["memory[1]"]


def test_convert_with_nothing_decodable_fails(params: Params) -> None:
    def broken() -> Image.Image:
        return Image.open(io.BytesIO(b""))

    source = _in_memory_source([broken, broken], official=[False, False])
    with pytest.raises(ValueError, match="no image of memory could be decoded"):
        convert.fn(source, _data_params(params, image_size=4))
