"""On-disk readers round-trip what their writers wrote, read only their block, and name the
file in every error."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import nibabel as nib
import nibabel.openers
import numpy as np
import pytest
import tifffile
import zarr
from tifffile.zarr import ZarrTiffStore
from zarr.storage import LocalStore

from haloseg.data import (
    Dataset,
    MSDDataset,
    TiffDataset,
    ZarrDataset,
    write_msd,
    write_tiff,
    write_zarr,
)
from haloseg.errors import DataError


def _case(rng: np.random.Generator, channels: int, shape: tuple[int, ...], classes: int):
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    label = rng.integers(0, classes, size=shape)
    return image, label


def _assert_box(dataset: Dataset, index: int, box, image: np.ndarray, label: np.ndarray):
    got_image, got_label = dataset.read(index, box)
    slices = tuple(slice(lo, hi) for lo, hi in box)
    assert got_image.dtype == np.float32 and got_label.dtype == np.int64
    np.testing.assert_array_equal(got_image, image[(slice(None), *slices)])
    np.testing.assert_array_equal(got_label, label[slices])


def _full(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(0, n) for n in shape]


# --- Medical Segmentation Decathlon -------------------------------------------------------


MSD_SHAPE = (12, 10, 7)
MSD_BOXES = [_full(MSD_SHAPE), [(1, 8), (3, 10), (0, 5)], [(11, 12), (0, 3), (6, 7)]]


def _msd(tmp_path: Path, channels: int = 2, *, compress: bool = True, cases: int = 2):
    rng = np.random.default_rng(0)
    data = [_case(rng, channels, MSD_SHAPE, 3) for _ in range(cases)]
    root = tmp_path / "Task99_Test"
    names = ["FLAIR", "T1w", "T1gd", "T2w"][:channels]
    write_msd(root, *zip(*data), modality=names, labels_names=["bg", "a", "b"], compress=compress)
    return root, data


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("compress", [True, False])
def test_msd_round_trip(tmp_path, channels, compress):
    root, data = _msd(tmp_path, channels, compress=compress)
    dataset = MSDDataset(root)
    assert isinstance(dataset, Dataset)
    assert (len(dataset), dataset.spatial_dims) == (2, 3)
    assert (dataset.in_channels, dataset.num_classes) == (channels, 3)
    suffix = ".nii.gz" if compress else ".nii"
    assert dataset.info(1).name == f"case_001{suffix}"
    assert dataset.info(1).shape == MSD_SHAPE
    for index, (image, label) in enumerate(data):
        for box in MSD_BOXES:
            _assert_box(dataset, index, box, image, label)


def test_msd_indices_pick_cases_and_survive_pickling(tmp_path):
    root, data = _msd(tmp_path, cases=3)
    dataset = MSDDataset(root, indices=[2, 0])
    _assert_box(dataset, 0, MSD_BOXES[1], *data[2])
    copy = pickle.loads(pickle.dumps(dataset))
    _assert_box(copy, 1, MSD_BOXES[1], *data[0])
    with pytest.raises(IndexError):
        dataset.info(2)
    with pytest.raises(DataError, match=r"indices \[3\].*Task99_Test"):
        MSDDataset(root, indices=[3])


def test_msd_uncompressed_reads_only_block_bytes(tmp_path, monkeypatch):
    """An 8³ block of a 48³ uncompressed volume reads a few percent of the file's bytes."""
    rng = np.random.default_rng(1)
    image, label = _case(rng, 1, (48, 48, 48), 2)
    root = tmp_path / "Task98_Big"
    write_msd(root, [image], [label], modality=["CT"], labels_names=["bg", "fg"], compress=False)
    dataset = MSDDataset(root)
    dataset.info(0)  # headers only

    read_bytes = []
    original = nibabel.openers.Opener.read

    def counting_read(self, *args):
        data = original(self, *args)
        read_bytes.append(len(data))
        return data

    monkeypatch.setattr(nibabel.openers.Opener, "read", counting_read)
    _assert_box(dataset, 0, [(20, 28), (8, 16), (30, 38)], image, label)
    image_file = root / "imagesTr" / "case_000.nii"
    assert 0 < sum(read_bytes) < 0.05 * image_file.stat().st_size


def _break_json(root: Path, change) -> None:
    path = root / "dataset.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def _replace_label(root: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "labelsTr" / "case_001.nii.gz")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


MSD_BREAKS = {
    "missing json": (lambda r: (r / "dataset.json").unlink(), r"dataset\.json does not exist"),
    "invalid json": (
        lambda r: (r / "dataset.json").write_text("{not json"),
        r"dataset\.json is not valid JSON",
    ),
    "no training": (
        lambda r: _break_json(r, lambda s: s.update(training=[])),
        r"dataset\.json.*lists no training cases",
    ),
    "escapes folder": (
        lambda r: _break_json(r, lambda s: s["training"][0].update(image="../../etc/x.nii.gz")),
        r"'\.\./\.\./etc/x\.nii\.gz'.*outside the dataset folder",
    ),
    "missing label": (
        lambda r: (r / "labelsTr" / "case_001.nii.gz").unlink(),
        r"labelsTr/case_001\.nii\.gz does not exist",
    ),
    "corrupt image": (
        lambda r: (r / "imagesTr" / "case_001.nii.gz").write_bytes(b"not a nifti file" * 40),
        r"imagesTr/case_001\.nii\.gz is not a readable NIfTI",
    ),
    "truncated image": (
        lambda r: _truncate(r / "imagesTr" / "case_001.nii.gz"),
        r"imagesTr/case_001\.nii\.gz is not a readable NIfTI",
    ),
    "shape mismatch": (
        lambda r: _replace_label(r, np.zeros((12, 10, 6), np.uint8)),
        r"case_001\.nii\.gz has spatial shape \(12, 10, 7\) but its label .*\(12, 10, 6\)",
    ),
    "channel count": (
        lambda r: _break_json(r, lambda s: s["modality"].update({"2": "T2w"})),
        r"case_001\.nii\.gz has 2 channels .* lists 3 modalities",
    ),
    "label out of range": (
        lambda r: _replace_label(r, np.full(MSD_SHAPE, 7, np.uint8)),
        r"labelsTr/case_001\.nii\.gz holds label values 7\.\.7; expected 0\.\.2",
    ),
}


@pytest.mark.parametrize("broken", sorted(MSD_BREAKS))
def test_msd_bad_input_names_the_file(tmp_path, broken):
    root, _ = _msd(tmp_path)
    damage, message = MSD_BREAKS[broken]
    damage(root)
    with pytest.raises(DataError, match=message):
        dataset = MSDDataset(root)
        dataset.read(1, MSD_BOXES[0])


def test_msd_nan_is_reported_only_in_blocks_that_hold_it(tmp_path):
    image = np.zeros((1, *MSD_SHAPE), np.float32)
    image[0, 10, 2, 3] = np.nan
    root = tmp_path / "Task97_NaN"
    label = np.zeros(MSD_SHAPE, np.uint8)
    write_msd(root, [image], [label], modality=["CT"], labels_names=["bg", "fg"])
    dataset = MSDDataset(root)
    dataset.read(0, [(0, 10), (0, 10), (0, 7)])
    with pytest.raises(DataError, match=r"case_000\.nii\.gz holds 1 NaN or Inf"):
        dataset.read(0, MSD_BOXES[0])


def test_msd_gzip_block_matches(tmp_path):
    """A .nii.gz is a real gzip stream; its blocks match the array written."""
    root, data = _msd(tmp_path, compress=True)
    with gzip.open(root / "imagesTr" / "case_000.nii.gz") as stream:
        assert stream.read(4)  # decompresses, so the writer did compress
    _assert_box(MSDDataset(root), 0, MSD_BOXES[2], *data[0])


# --- TIFF ---------------------------------------------------------------------------------


TIFF_SHAPE = (50, 37)
TIFF_BOXES = [_full(TIFF_SHAPE), [(3, 41), (16, 37)], [(49, 50), (0, 1)]]


def _tiff(tmp_path: Path, bands: int = 3, count: int = 2, **options):
    rng = np.random.default_rng(2)
    data = [_case(rng, bands, TIFF_SHAPE, 4) for _ in range(count)]
    for number, (image, label) in enumerate(data):
        write_tiff(
            tmp_path / "images" / f"scene{number}.tif", image[0] if bands == 1 else image, **options
        )
        write_tiff(tmp_path / "labels" / f"scene{number}.tif", label.astype(np.uint8), **options)
    return data


@pytest.mark.parametrize("bands", [1, 3])
@pytest.mark.parametrize("planar", [True, False])
@pytest.mark.parametrize(("tile", "compress"), [((16, 16), True), (None, True), (None, False)])
def test_tiff_round_trip(tmp_path, bands, planar, tile, compress):
    data = _tiff(tmp_path, bands, tile=tile, planar=planar, compress=compress)
    dataset = TiffDataset.from_folder(tmp_path, num_classes=4)
    assert isinstance(dataset, Dataset)
    assert (len(dataset), dataset.spatial_dims, dataset.in_channels) == (2, 2, bands)
    assert dataset.info(1) == type(dataset.info(1))(name="scene1.tif", shape=TIFF_SHAPE)
    for index, (image, label) in enumerate(data):
        for box in TIFF_BOXES:
            _assert_box(dataset, index, box, image, label)
    _assert_box(pickle.loads(pickle.dumps(dataset)), 1, TIFF_BOXES[1], *data[1])
    dataset.close()


def test_tiff_explicit_channel_axis(tmp_path):
    """Bands first in a multi-page file that tifffile cannot tell from a volume."""
    image, label = _case(np.random.default_rng(3), 5, TIFF_SHAPE, 2)
    tifffile.imwrite(tmp_path / "image.tif", image)
    write_tiff(tmp_path / "label.tif", label.astype(np.uint8))
    dataset = TiffDataset(
        [tmp_path / "image.tif"], [tmp_path / "label.tif"], num_classes=2, channel_axis="first"
    )
    assert dataset.in_channels == 5
    _assert_box(dataset, 0, TIFF_BOXES[1], image, label)


def test_tiff_tiled_decodes_only_intersecting_tiles(tmp_path, monkeypatch):
    """Tiles outside the block are overwritten with garbage; the block still reads, the whole
    scene does not, and the tiles asked of tifffile's store are exactly the intersecting ones."""
    rng = np.random.default_rng(4)
    image, label = _case(rng, 2, (64, 80), 3)
    image_path = write_tiff(tmp_path / "image.tif", image, tile=(16, 16))
    label_path = write_tiff(tmp_path / "label.tif", label.astype(np.uint8), tile=(16, 16))
    box = [(17, 40), (33, 50)]  # tile rows 1..2, tile columns 2..3
    inside = {(r, c) for r in (1, 2) for c in (2, 3)}
    for path in (image_path, label_path):
        with tifffile.TiffFile(path) as tif:
            offsets, sizes = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
        with open(path, "r+b") as file:
            for tile, (offset, size) in enumerate(zip(offsets, sizes)):
                if divmod(tile % 20, 5) not in inside:
                    file.seek(offset)
                    file.write(b"\xff" * size)

    requested = []
    original = ZarrTiffStore.get

    async def recording_get(self, key, *args, **kwargs):
        requested.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", recording_get)
    dataset = TiffDataset([image_path], [label_path], num_classes=3)
    _assert_box(dataset, 0, box, image, label)
    chunks = sorted(key for key in requested if key[0].isdigit())  # not metadata
    image_tiles = [f"{plane}.{r}.{c}" for plane in (0, 1) for r, c in inside]
    assert chunks == sorted(image_tiles + [f"{r}.{c}" for r, c in inside])
    with pytest.raises(DataError, match=r"image\.tif is not a readable TIFF"):
        dataset.read(0, _full((64, 80)))


def test_tiff_uncompressed_is_memory_mapped(tmp_path):
    data = _tiff(tmp_path, 3, count=1, tile=None, compress=False)
    dataset = TiffDataset.from_folder(tmp_path, num_classes=4)
    dataset.read(0, TIFF_BOXES[1])
    opened = dataset._open(0)
    assert isinstance(opened.image, np.memmap) and isinstance(opened.label, np.memmap)
    _assert_box(dataset, 0, TIFF_BOXES[2], *data[0])


def _write_label(root: Path, array: np.ndarray) -> None:
    write_tiff(root / "labels" / "scene1.tif", array)


TIFF_BREAKS = {
    "empty folder": (
        lambda r: [p.unlink() for p in (r / "images").iterdir()],
        r"images holds no \.tif or \.tiff files",
    ),
    "image without label": (
        lambda r: (r / "labels" / "scene1.tif").unlink(),
        r"scene1\.tif has no label map; expected .*labels/scene1\.tif",
    ),
    "corrupt image": (
        lambda r: (r / "images" / "scene1.tif").write_bytes(b"II*\x00garbage" * 10),
        r"images/scene1\.tif is not a readable TIFF",
    ),
    "shape mismatch": (
        lambda r: _write_label(r, np.zeros((50, 36), np.uint8)),
        r"labels/scene1\.tif has shape \(50, 36\) but its image .* \(50, 37\)",
    ),
    "label not 2-D": (
        lambda r: _write_label(r, np.zeros((2, 50, 37), np.uint8)),
        r"labels/scene1\.tif has shape \(2, 50, 37\)",
    ),
    "band count": (
        lambda r: write_tiff(r / "images" / "scene1.tif", np.zeros((2, *TIFF_SHAPE), np.float32)),
        r"images/scene1\.tif has 2 bands but .*scene0\.tif has 3",
    ),
    "label out of range": (
        lambda r: _write_label(r, np.full(TIFF_SHAPE, 9, np.uint8)),
        r"labels/scene1\.tif holds label values 9\.\.9; expected 0\.\.3",
    ),
}


@pytest.mark.parametrize("broken", sorted(TIFF_BREAKS))
def test_tiff_bad_input_names_the_file(tmp_path, broken):
    _tiff(tmp_path, 3, tile=(16, 16))
    damage, message = TIFF_BREAKS[broken]
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        TiffDataset.from_folder(tmp_path, num_classes=4).read(1, TIFF_BOXES[0])


def test_tiff_missing_file_and_nan_name_the_file(tmp_path):
    image = np.zeros((2, *TIFF_SHAPE), np.float32)
    image[1, 40, 30] = np.inf
    write_tiff(tmp_path / "image.tif", image, tile=(16, 16))
    write_tiff(tmp_path / "label.tif", np.zeros(TIFF_SHAPE, np.uint8), tile=(16, 16))
    with pytest.raises(DataError, match=r"nowhere\.tif does not exist"):
        TiffDataset([tmp_path / "nowhere.tif"], [tmp_path / "label.tif"], num_classes=2)
    dataset = TiffDataset([tmp_path / "image.tif"], [tmp_path / "label.tif"], num_classes=2)
    dataset.read(0, [(0, 32), (0, 37)])
    with pytest.raises(DataError, match=r"image\.tif holds 1 NaN or Inf"):
        dataset.read(0, TIFF_BOXES[0])


# --- zarr ---------------------------------------------------------------------------------


def _zarr(tmp_path: Path, shape: tuple[int, ...], chunks=None, count: int = 3):
    rng = np.random.default_rng(5)
    data = [_case(rng, 2, shape, 3) for _ in range(count)]
    path = write_zarr(tmp_path / "data.zarr", *zip(*data), num_classes=3, chunks=chunks)
    return path, data


@pytest.mark.parametrize(
    ("shape", "chunks", "box"),
    [((30, 22), (8, 8), [(5, 21), (7, 22)]), ((13, 11, 9), (4, 4, 4), [(1, 12), (0, 5), (3, 9)])],
)
def test_zarr_round_trip(tmp_path, shape, chunks, box):
    path, data = _zarr(tmp_path, shape, chunks)
    dataset = ZarrDataset(path)
    assert isinstance(dataset, Dataset)
    assert (len(dataset), dataset.spatial_dims, dataset.in_channels) == (3, len(shape), 2)
    assert dataset.num_classes == 3 and dataset.info(2).shape == shape
    for index, (image, label) in enumerate(data):
        _assert_box(dataset, index, _full(shape), image, label)
        _assert_box(dataset, index, box, image, label)
    subset = pickle.loads(pickle.dumps(ZarrDataset(path, indices=[2], num_classes=5)))
    assert (len(subset), subset.num_classes, subset.info(0).name) == (1, 5, f"{path}/images[2]")
    _assert_box(subset, 0, box, *data[2])


def test_zarr_reads_only_intersecting_chunks(tmp_path, monkeypatch):
    """Chunks outside the block are overwritten with garbage; the block still reads, the whole
    sample does not, and the chunks asked of the store are exactly the intersecting ones."""
    path, data = _zarr(tmp_path, (32, 40), chunks=(8, 8), count=2)
    box = [(9, 20), (30, 40)]  # chunk rows 1..2, chunk columns 3..4
    inside = {(r, c) for r in (1, 2) for c in (3, 4)}
    for chunk in path.glob("*/c/**/*"):
        if chunk.is_file() and tuple(int(p) for p in chunk.parts[-2:]) not in inside:
            chunk.write_bytes(b"garbage")

    requested = []
    original = LocalStore.get

    async def recording_get(self, key, *args, **kwargs):
        requested.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", recording_get)
    dataset = ZarrDataset(path)
    requested.clear()
    _assert_box(dataset, 1, box, *data[1])
    chunks = [key for key in requested if "/c/" in key]  # not metadata
    assert sorted(chunks) == sorted(
        f"{array}/c/1{'/0' if array == 'images' else ''}/{r}/{c}"
        for array in ("images", "labels")
        for r, c in inside
    )
    with pytest.raises(DataError, match=r"data\.zarr/images\[1\]: a chunk cannot be read"):
        dataset.read(1, _full((32, 40)))


def _group(path: Path, images_shape, labels_shape, attrs=None) -> None:
    group = zarr.open_group(path, mode="w")
    group.attrs.update(attrs if attrs is not None else {"num_classes": 2})
    group.create_array("images", shape=images_shape, dtype="f4", fill_value=0)
    group.create_array("labels", shape=labels_shape, dtype="u1", fill_value=0)


ZARR_BREAKS = {
    "missing store": (lambda p: None, r"data\.zarr does not exist"),
    "not a group": (lambda p: p.mkdir(), r"data\.zarr is not a readable zarr group"),
    "missing key": (
        lambda p: zarr.open_group(p, mode="w").create_array(
            "images", shape=(1, 1, 4, 4), dtype="f4"
        ),
        r"data\.zarr has no array 'labels'; it holds \['images'\]",
    ),
    "shape mismatch": (
        lambda p: _group(p, (2, 1, 8, 8), (2, 8, 9)),
        r"data\.zarr/labels has shape \(2, 8, 9\) but .*images has \(2, 1, 8, 8\)",
    ),
    "empty": (lambda p: _group(p, (0, 1, 8, 8), (0, 8, 8)), r"data\.zarr holds no samples"),
    "no num_classes": (
        lambda p: _group(p, (1, 1, 8, 8), (1, 8, 8), attrs={}),
        r"data\.zarr has no 'num_classes' attribute",
    ),
}


@pytest.mark.parametrize("broken", sorted(ZARR_BREAKS))
def test_zarr_bad_input_names_the_store(tmp_path, broken):
    damage, message = ZARR_BREAKS[broken]
    damage(tmp_path / "data.zarr")
    with pytest.raises(DataError, match=message):
        ZarrDataset(tmp_path / "data.zarr")


def test_zarr_nan_and_existing_store(tmp_path):
    image = np.zeros((1, 16, 16), np.float32)
    image[0, 12, 12] = np.nan
    path = write_zarr(tmp_path / "data.zarr", [image], [np.zeros((16, 16))], num_classes=2)
    dataset = ZarrDataset(path)
    dataset.read(0, [(0, 8), (0, 16)])
    with pytest.raises(DataError, match=r"data\.zarr/images\[0\] holds 1 NaN or Inf"):
        dataset.read(0, _full((16, 16)))
    with pytest.raises(DataError, match=r"data\.zarr already exists.*overwrite=True"):
        write_zarr(path, [image], [np.zeros((16, 16))], num_classes=2)
    write_zarr(path, [image[:, :8]] * 2, [np.ones((8, 16))] * 2, num_classes=2, overwrite=True)
    assert len(ZarrDataset(path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["data.zarr"]


def test_writers_refuse_inconsistent_arrays(tmp_path):
    image = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(DataError, match=r"labels have shape \(8, 9\); expected \(8, 8\)"):
        write_zarr(tmp_path / "x.zarr", [image], [np.zeros((8, 9))], num_classes=2)
    with pytest.raises(DataError, match=r"image 0 has shape \(2, 8, 8\); expected \(2, H, W, D\)"):
        write_msd(
            tmp_path / "t",
            [image],
            [np.zeros((8, 8))],
            modality=["a", "b"],
            labels_names=["bg", "x"],
        )
    with pytest.raises(DataError, match=r"tile \(10, 10\) .* multiples of 16"):
        write_tiff(tmp_path / "x.tif", image, tile=(10, 10))
