"""Sources: digits, Fashion-MNIST IDX files (synthetic and the Debian package), ImageFolders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.prepare import decode, select, staging_file
from tasks.data.sources import FASHION_MNIST_CLASSES, build_source, cap_per_class, read_idx
from tasks.data.spec import image_spec
from tasks.data.splits import stratified_split
from tasks.params import DataParams, Params
from tests.fashion_mnist import FASHION_MNIST_DIR, needs_fashion_mnist
from tests.imagefolders import build_messy_folder, noise


def data_params(params: Params, **update: object) -> DataParams:
    return DataParams(**{**params.data.model_dump(), **update})


def _pixels(source, i: int) -> np.ndarray:
    return np.asarray(source.items.open(source.items.read(i)))


def test_digits_source(params: Params) -> None:
    source = build_source(data_params(params, source="digits"))
    assert len(source) == 1797
    assert source.classes == tuple(str(i) for i in range(10))
    assert np.bincount(source.labels).size == 10
    assert source.official_test is None
    assert _pixels(source, 0).shape == (8, 8)
    # digits' 0..16 intensities are spread over the uint8 range
    assert max(_pixels(source, i).max() for i in range(20)) == 255


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = noise((3, 4, 5), 0)
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
    data = data_params(params, source="fashion-mnist", fashion_mnist_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_source(data)


def test_fashion_mnist_reads_idx_and_marks_official_test(params: Params, tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", noise((3, 28, 28), 0))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2], np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", noise((2, 28, 28), 1))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 8], np.uint8))
    source = build_source(data_params(params, source="fashion-mnist", fashion_mnist_dir=tmp_path))
    assert source.classes == FASHION_MNIST_CLASSES
    assert source.labels.tolist() == [0, 1, 2, 9, 8]
    assert source.official_test.tolist() == [False, False, False, True, True]
    assert np.array_equal(_pixels(source, 3), noise((2, 28, 28), 1)[0])


@needs_fashion_mnist
def test_the_real_fashion_mnist_keeps_its_official_split(params: Params, tmp_path: Path) -> None:
    data = data_params(params, source="fashion-mnist", fashion_mnist_dir=FASHION_MNIST_DIR)
    source = build_source(data)
    assert len(source) == 70_000
    assert int(source.official_test.sum()) == 10_000
    assert np.bincount(source.labels).tolist() == [7000] * 10
    assert _pixels(source, 0).shape == (28, 28)
    # A quick run's cap keeps both parts of the official split in every class.
    capped = cap_per_class(source, 35, seed=0)
    assert np.bincount(capped.labels).tolist() == [35] * 10
    for c in range(10):
        assert capped.official_test[capped.labels == c].sum() == 5  # 35 * 10k / 70k

    # ...and the subset goes through prepare's decode, selection and split.
    spec = image_spec(data_params(params, image_size=28, channels=1))
    with staging_file(tmp_path / "prepared", len(capped), spec) as staging:
        decoded = decode.fn(capped, spec, staging, workers=1, log=lambda line: None)
        assert np.array_equal(np.load(staging.path)[0, ..., 0], _pixels(capped, 0))
    assert decoded.ok.all() and decoded.converted == 0  # 28x28 grayscale: stored as is
    selection = select.fn(capped, decoded, min_per_class=10)
    kept = selection.positions
    splits = stratified_split(
        capped.labels[kept], 0.15, 0.15, seed=0, official_test=capped.official_test[kept]
    )
    assert len(splits["test"]) == int(capped.official_test[kept].sum())


def test_image_folder_lists_images_and_counts_what_it_ignores(
    params: Params, tmp_path: Path
) -> None:
    expected = build_messy_folder(tmp_path)
    source = build_source(data_params(params, source=str(tmp_path)))
    assert source.classes == ("a", "b", "c")
    names = {str(Path(n).relative_to(tmp_path)) for n in source.item_names}
    assert "a/nested/deeper/cmyk.jpg" in names  # nested folders inside a class
    assert set(expected["quarantined"]) <= names  # broken files are items: decode decides
    assert not any("ipynb" in n or "DS_Store" in n or n.endswith(".txt") for n in names)
    assert source.ignored == {"hidden": 3, "not_an_image_suffix": 1, "outside_a_class_folder": 1}
    by_name = dict(zip(source.item_names, source.labels.tolist(), strict=True))
    assert by_name[str(tmp_path / "b/good3.png")] == 1


def _save(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10)).save(path)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([], "no class sub-folders"),
        (["loose.png"], "no class sub-folders"),
        (["cat/1.png", "cat/2.png"], "one class"),
        (["cat/1.png", "dog/notes.txt"], r"class folder\(s\) dog .* hold no image files"),
        (["cat/1.png", "dog/.hidden.png"], r"class folder\(s\) dog"),
    ],
)
def test_image_folder_fatal_problems_fail_fast(
    params: Params, tmp_path: Path, layout: list[str], message: str
) -> None:
    for name in layout:
        if name.endswith(".png"):
            _save(tmp_path / name)
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("x")
    with pytest.raises(ValueError, match=message):
        build_source(data_params(params, source=str(tmp_path)))


def test_a_class_folder_linked_from_outside_the_root_is_an_error_unless_followed(
    params: Params, tmp_path: Path
) -> None:
    for name in ("elsewhere/dogs/0.png", "root/cats/0.png"):
        _save(tmp_path / name)
    (tmp_path / "root/dogs").symlink_to(tmp_path / "elsewhere/dogs")
    root = str(tmp_path / "root")
    with pytest.raises(ValueError, match=r"dogs -> .*elsewhere/dogs .* data.symlinks: follow"):
        build_source(data_params(params, source=root))
    source = build_source(data_params(params, source=root, symlinks="follow"))
    assert source.classes == ("cats", "dogs") and source.symlinks == {"outside_root": 1}


def test_a_missing_source_fails_at_params_naming_the_key(params: Params, tmp_path: Path) -> None:
    from tasks.params import ParamsError, parse_params

    raw = params.model_dump(mode="json")
    raw["data"]["source"] = str(tmp_path / "nowhere")
    with pytest.raises(ParamsError, match=r"data\.source: must be one of digits, fashion-mnist"):
        parse_params(raw)
    (tmp_path / "nowhere.dvc").write_text("outs: []\n")  # tracked by DVC, not pulled
    with pytest.raises(ParamsError, match="dvc pull"):
        parse_params(raw)


def test_cap_per_class_is_seeded_and_keeps_order(params: Params) -> None:
    source = build_source(data_params(params, source="digits"))
    capped = cap_per_class(source, 20, seed=1)
    assert np.bincount(capped.labels).tolist() == [20] * 10
    positions = [int(name[7:-1]) for name in capped.item_names]  # "digits[123]"
    assert positions == sorted(positions)
    assert np.array_equal(cap_per_class(source, 20, seed=1).item_names, capped.item_names)
    assert not np.array_equal(cap_per_class(source, 20, seed=2).item_names, capped.item_names)
    assert cap_per_class(source, None, seed=1) is source
