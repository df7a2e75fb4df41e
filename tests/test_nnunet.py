"""The nnU-Net v2 raw reader round-trips what write_nnunet wrote, parses regions and the
ignore label, and names the file in every error."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import nibabel as nib
import nibabel.openers
import numpy as np
import pytest

from haloseg.data.base import Dataset
from haloseg.data.nnunet import NnUNetDataset, nnunet_images, write_nnunet
from haloseg.errors import DataError

SHAPE = (12, 10, 8)
BOXES = [[(0, 12), (0, 10), (0, 8)], [(1, 8), (3, 10), (0, 5)], [(11, 12), (0, 3), (7, 8)]]
CHANNELS = ["T1", "T2", "FLAIR"]
LABELS = {"background": 0, "edema": 1, "tumor": 2}
# Flipped first axis, anisotropic voxels, an origin: spacing and orientation must come through.
AFFINE = np.array(
    [[-0.9, 0, 0, 40.0], [0, 0.9, 0, -12.5], [0, 0, 2.5, 7.0], [0, 0, 0, 1]], dtype=np.float64
)
BRATS = {
    "background": 0,
    "whole_tumor": [1, 2, 3],
    "tumor_core": [2, 3],
    "enhancing_tumor": 3,
}


def _cases(count: int, channels: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(channels, *SHAPE)).astype(np.float32) for _ in range(count)]
    labels = [rng.integers(0, classes, size=SHAPE) for _ in range(count)]
    return images, labels


def _dataset(tmp_path: Path, cases: int = 2, **kwargs):
    root = tmp_path / "Dataset001_Tiny"
    images, labels = _cases(cases, len(CHANNELS), len(LABELS))
    options = {"channel_names": CHANNELS, "labels_spec": LABELS, "affine": AFFINE, **kwargs}
    write_nnunet(root, images, labels, **options)
    return root, images, labels


def _assert_box(dataset: Dataset, index: int, box, image: np.ndarray, label: np.ndarray):
    got_image, got_label = dataset.read(index, box)
    slices = tuple(slice(lo, hi) for lo, hi in box)
    assert got_image.dtype == np.float32 and got_label.dtype == np.int64
    np.testing.assert_array_equal(got_image, image[(slice(None), *slices)])
    np.testing.assert_array_equal(got_label, label[slices])


@pytest.mark.parametrize("file_ending", [".nii.gz", ".nii"])
def test_blocks_match_the_arrays_written(tmp_path, file_ending):
    root, images, labels = _dataset(tmp_path, file_ending=file_ending)
    dataset = NnUNetDataset(root)
    assert isinstance(dataset, Dataset)
    assert (dataset.spatial_dims, dataset.in_channels, dataset.num_classes) == (3, 3, 3)
    assert len(dataset) == 2 and dataset.case_names == ["case_000", "case_001"]
    for index in range(2):
        for box in BOXES:
            _assert_box(dataset, index, box, images[index], labels[index])


def test_layout_is_nnunet_v2(tmp_path):
    root, _, _ = _dataset(tmp_path)
    spec = json.loads((root / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert spec["labels"] == LABELS and spec["numTraining"] == 2
    assert spec["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (root / "imagesTr").iterdir())[:3] == [
        "case_000_0000.nii.gz",
        "case_000_0001.nii.gz",
        "case_000_0002.nii.gz",
    ]
    assert (root / "labelsTr" / "case_001.nii.gz").is_file()


def test_channels_follow_the_channel_index_not_the_json_order(tmp_path):
    root, images, labels = _dataset(tmp_path)
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"2": "FLAIR", "0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(spec))
    dataset = NnUNetDataset(root)
    assert dataset.channel_names == CHANNELS
    image, _ = dataset.read(0, BOXES[0])
    for channel in range(3):
        np.testing.assert_array_equal(image[channel], images[0][channel])


def test_uncompressed_reads_only_block_bytes(tmp_path, monkeypatch):
    """An 8³ block of two 48³ uncompressed channels and the label reads a few percent of
    the files' bytes."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 48, 48, 48)).astype(np.float32)
    label = rng.integers(0, 2, size=(48, 48, 48))
    root = tmp_path / "Dataset098_Big"
    spec = {"background": 0, "fg": 1}
    write_nnunet(root, [image], [label], channel_names=["CT", "PET"], labels_spec=spec,
                 file_ending=".nii")  # fmt: skip
    dataset = NnUNetDataset(root)
    dataset.info(0)  # headers only
    read_bytes = []
    original = nibabel.openers.Opener.read

    def counting_read(self, *args):
        data = original(self, *args)
        read_bytes.append(len(data))
        return data

    monkeypatch.setattr(nibabel.openers.Opener, "read", counting_read)
    _assert_box(dataset, 0, [(20, 28), (8, 16), (30, 38)], image, label)
    files = [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]
    assert len(files) == 3
    assert 0 < sum(read_bytes) < 0.05 * sum(f.stat().st_size for f in files)


def test_nan_names_the_channel_file(tmp_path):
    root, images, _ = _dataset(tmp_path)
    images[0][1, 10, 2, 3] = np.nan
    _save(root / "imagesTr" / "case_000_0001.nii.gz", images[0][1])
    dataset = NnUNetDataset(root)
    dataset.read(0, [(0, 10), (0, 10), (0, 8)])
    with pytest.raises(DataError, match=r"imagesTr/case_000_0001\.nii\.gz holds 1 NaN or Inf"):
        dataset.read(0, BOXES[0])


def test_info_gives_spacing_and_orientation(tmp_path):
    root, _, _ = _dataset(tmp_path)
    info = NnUNetDataset(root).info(1)
    assert info.name == "case_001" and info.shape == SHAPE
    assert info.spacing == pytest.approx((0.9, 0.9, 2.5))
    assert info.orientation == "LAS"


def test_indices_pick_cases_and_survive_pickling(tmp_path):
    root, images, labels = _dataset(tmp_path, cases=3)
    dataset = NnUNetDataset(root, indices=[2, 0])
    assert dataset.case_names == ["case_002", "case_000"]
    _assert_box(dataset, 0, BOXES[1], images[2], labels[2])
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._opened == {}
    _assert_box(copy, 1, BOXES[1], images[0], labels[0])
    with pytest.raises(DataError, match=r"indices \[3\]"):
        NnUNetDataset(root, indices=[3])
    with pytest.raises(IndexError):
        dataset.read(2, BOXES[0])


def test_plain_labels_are_named_by_class(tmp_path):
    dataset = NnUNetDataset(_dataset(tmp_path)[0])
    assert dataset.label_names == ["background", "edema", "tumor"]
    assert dataset.regions == {} and dataset.ignore_label is None


def test_regions_with_class_order(tmp_path):
    root = tmp_path / "Dataset137_BraTS"
    images, labels = _cases(1, 4, 4)
    write_nnunet(
        root,
        images,
        labels,
        channel_names=["T1", "T1ce", "T2", "FLAIR"],
        labels_spec=BRATS,
        regions_class_order=[1, 2, 3],
    )
    dataset = NnUNetDataset(root)
    assert dataset.num_classes == 4
    assert dataset.label_names == ["background", "class1", "class2", "enhancing_tumor"]
    assert dataset.regions == {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3]}
    _assert_box(dataset, 0, BOXES[1], images[0], labels[0])


def test_regions_without_class_order_are_unions_of_named_classes(tmp_path):
    spec = {"background": 0, "edema": [1], "tumor": 2, "lesion": [1, 2]}
    images, labels = _cases(1, 3, 3)
    root = tmp_path / "Dataset002_Union"
    write_nnunet(root, images, labels, channel_names=CHANNELS, labels_spec=spec)
    dataset = NnUNetDataset(root)
    assert dataset.num_classes == 3 and dataset.regions == {"lesion": [1, 2]}
    assert dataset.label_names == ["background", "edema", "tumor"]


def test_ignore_label_is_read_but_not_a_class(tmp_path):
    images, labels = _cases(1, 3, 3)
    labels[0][:3] = 3
    root = tmp_path / "Dataset003_Sparse"
    spec = {**LABELS, "ignore": 3}
    write_nnunet(root, images, labels, channel_names=CHANNELS, labels_spec=spec)
    dataset = NnUNetDataset(root)
    assert (dataset.num_classes, dataset.ignore_label) == (3, 3)
    assert dataset.label_names == ["background", "edema", "tumor"]
    _assert_box(dataset, 0, BOXES[0], images[0], labels[0])


def test_ignore_label_setting_supplies_or_must_match_dataset_json(tmp_path):
    root, images, labels = _dataset(tmp_path)
    labels[1][2:4] = 255
    _save(root / "labelsTr" / "case_001.nii.gz", labels[1].astype(np.uint8))
    with pytest.raises(DataError, match=r"case_001\.nii\.gz holds label values 0\.\.255"):
        NnUNetDataset(root).read(1, BOXES[0])
    dataset = NnUNetDataset(root, ignore_label=255)
    assert dataset.ignore_label == 255
    _assert_box(dataset, 1, BOXES[0], images[1], labels[1])
    with pytest.raises(DataError, match=r"ignore_label=2 is not above the classes 0\.\.2 of "):
        NnUNetDataset(root, ignore_label=2)
    _edit_json(root, lambda s: s["labels"].update(ignore=3))
    assert NnUNetDataset(root, ignore_label=3).ignore_label == 3
    with pytest.raises(
        DataError, match=r'ignore_label=255 but .*dataset\.json declares "ignore": 3'
    ):
        NnUNetDataset(root, ignore_label=255)


def test_values_between_classes_and_a_high_ignore_label_are_refused(tmp_path):
    images, labels = _cases(1, 3, 3)
    root = tmp_path / "Dataset004_Ignore255"
    write_nnunet(root, images, labels, channel_names=CHANNELS, labels_spec={**LABELS, "ignore": 9})
    labels[0][0, 0, 0] = 9
    labels[0][1, 1, 1] = 5
    nib.save(
        nib.Nifti1Image(labels[0].astype(np.uint8), np.eye(4)),
        root / "labelsTr" / "case_000.nii.gz",
    )
    dataset = NnUNetDataset(root)
    dataset.read(0, [(0, 1), (0, 1), (0, 1)])
    with pytest.raises(DataError, match=r"case_000\.nii\.gz holds label value 5; .*ignore label 9"):
        dataset.read(0, BOXES[0])


def _edit_json(root: Path, change) -> None:
    path = root / "dataset.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def _save(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, AFFINE), path)


BREAKS = {
    "missing json": (lambda r: (r / "dataset.json").unlink(), r"dataset\.json does not exist"),
    "invalid json": (
        lambda r: (r / "dataset.json").write_text("{not json"),
        r"dataset\.json is not valid JSON",
    ),
    "no channel_names": (
        lambda r: _edit_json(r, lambda s: s.pop("channel_names")),
        r"dataset\.json lacks 'channel_names'",
    ),
    "v1 modality": (
        lambda r: _edit_json(r, lambda s: s.update(modality=s.pop("channel_names"))),
        r"dataset\.json lacks 'channel_names'.*MSDDataset",
    ),
    "no labels": (
        lambda r: _edit_json(r, lambda s: s.pop("labels")),
        r"dataset\.json lacks 'labels'",
    ),
    "no file_ending": (
        lambda r: _edit_json(r, lambda s: s.pop("file_ending")),
        r"dataset\.json lacks 'file_ending'",
    ),
    "png": (
        lambda r: _edit_json(r, lambda s: s.update(file_ending=".png")),
        r"dataset\.json has file_ending '\.png'; this reader reads NIfTI",
    ),
    "channel keys": (
        lambda r: _edit_json(r, lambda s: s["channel_names"].update({"5": "PD"})),
        r"channel_names has keys .*'5'.*expected \['0', '1', '2', '3'\]",
    ),
    "missing channel": (
        lambda r: (r / "imagesTr" / "case_001_0002.nii.gz").unlink(),
        r"imagesTr/case_001_0002\.nii\.gz does not exist but dataset\.json lists 3 channels "
        r"\(channel_names\); add the file or remove case case_001 from labelsTr",
    ),
    "extra channel listed": (
        lambda r: _edit_json(r, lambda s: s["channel_names"].update({"3": "PD"})),
        r"imagesTr/case_000_0003\.nii\.gz does not exist but dataset\.json lists 4 channels",
    ),
    "no labelsTr": (
        lambda r: [p.unlink() for p in (r / "labelsTr").iterdir()],
        r"labelsTr holds no \*\.nii\.gz files",
    ),
    "corrupt channel": (
        lambda r: (r / "imagesTr" / "case_001_0001.nii.gz").write_bytes(b"not nifti" * 50),
        r"imagesTr/case_001_0001\.nii\.gz is not a readable NIfTI",
    ),
    "channel shapes differ": (
        lambda r: _save(r / "imagesTr" / "case_001_0001.nii.gz", np.zeros((12, 10, 7), np.float32)),
        r"imagesTr/case_001_0001\.nii\.gz has shape \(12, 10, 7\) but "
        r".*imagesTr/case_001_0000\.nii\.gz has \(12, 10, 8\)",
    ),
    "4-D channel": (
        lambda r: _save(r / "imagesTr" / "case_001_0000.nii.gz", np.zeros((*SHAPE, 2), np.float32)),
        r"imagesTr/case_001_0000\.nii\.gz has shape \(12, 10, 8, 2\); expected a 3-D",
    ),
    "label shape": (
        lambda r: _save(r / "labelsTr" / "case_001.nii.gz", np.zeros((12, 10, 6), np.uint8)),
        r"labelsTr/case_001\.nii\.gz has shape \(12, 10, 6\) but its image "
        r".*case_001_0000\.nii\.gz has \(12, 10, 8\)",
    ),
    "label out of range": (
        lambda r: _save(r / "labelsTr" / "case_001.nii.gz", np.full(SHAPE, 7, np.uint8)),
        r"labelsTr/case_001\.nii\.gz holds label values 7\.\.7; expected 0\.\.2",
    ),
    "label beyond ignore": (
        lambda r: (
            _edit_json(r, lambda s: s["labels"].update(ignore=3)),
            _save(r / "labelsTr" / "case_001.nii.gz", np.full(SHAPE, 4, np.uint8)),
        ),
        r"labelsTr/case_001\.nii\.gz holds label values 4\.\.4; expected 0\.\.3",
    ),
}


@pytest.mark.parametrize("broken", sorted(BREAKS))
def test_bad_input_names_the_file(tmp_path, broken):
    root, _, _ = _dataset(tmp_path)
    damage, message = BREAKS[broken]
    damage(root)
    with pytest.raises(DataError, match=message):
        NnUNetDataset(root).read(1, BOXES[0])


LABEL_BREAKS = {
    "ignore not highest": (
        {**LABELS, "ignore": 1},
        None,
        r"ignore label 1 is not above every other label value \(highest 2\).*renumber it to 3",
    ),
    "ignore list": ({**LABELS, "ignore": [3, 4]}, None, r"ignore label is \[3, 4\]; .*not a list"),
    "no background": (
        {"edema": 1, "tumor": 2},
        None,
        r'labels has background None; nnU-Net requires "background": 0',
    ),
    "gap": ({"background": 0, "a": 1, "c": 3}, None, r"labels skips class value\(s\) \[2\]"),
    "duplicate": ({**LABELS, "other": 2}, None, r"labels \['tumor', 'other'\] all have value 2"),
    "not a number": ({**LABELS, "x": "3"}, None, r"label 'x' is '3'; expected a non-negative"),
    "region of non-classes": (
        {**LABELS, "lesion": [2, 5]},
        None,
        r"label 'lesion' lists \[5\], which are not classes \(0\.\.2\)",
    ),
    "order length": (BRATS, [1, 2], r"regions_class_order is \[1, 2\]; expected 3 distinct"),
    "order gap": (BRATS, [1, 2, 4], r"regions_class_order skips class value\(s\) \[3\]"),
    "region outside order": (
        {**BRATS, "enhancing_tumor": 5},
        [1, 2, 3],
        r"label 'enhancing_tumor' lists \[5\], which are not classes \(0\.\.3\)",
    ),
}


@pytest.mark.parametrize("broken", sorted(LABEL_BREAKS))
def test_bad_labels_name_dataset_json(tmp_path, broken):
    root, _, _ = _dataset(tmp_path)
    labels, order, message = LABEL_BREAKS[broken]

    def change(spec):
        spec["labels"] = labels
        if order is not None:
            spec["regions_class_order"] = order

    _edit_json(root, change)
    with pytest.raises(DataError, match=r"dataset\.json: " + message):
        NnUNetDataset(root)


def test_numtraining_mismatch_is_logged(tmp_path, caplog):
    root, _, _ = _dataset(tmp_path)
    _edit_json(root, lambda s: s.update(numTraining=5))
    with caplog.at_level(logging.WARNING, logger="haloseg.data.nnunet"):
        assert len(NnUNetDataset(root)) == 2
    assert "numTraining 5 but labelsTr holds 2 cases" in caplog.text


def test_writer_refuses_what_it_cannot_write_consistently(tmp_path):
    images, labels = _cases(1, 3, 3)
    options = {"channel_names": CHANNELS, "labels_spec": LABELS}
    with pytest.raises(DataError, match=r"image 0 has shape \(3, 12, 10, 8\); expected \(2, H"):
        write_nnunet(tmp_path / "a", images, labels, channel_names=["T1", "T2"], labels_spec=LABELS)
    with pytest.raises(DataError, match=r"label 0 holds label values 5\.\.5; expected 0\.\.2"):
        write_nnunet(tmp_path / "b", images, [np.full(SHAPE, 5)], **options)
    with pytest.raises(DataError, match=r"affine has shape \(3, 3\)"):
        write_nnunet(tmp_path / "c", images, labels, affine=np.eye(3), **options)
    assert not any(tmp_path.iterdir())


def test_nnunet_images_groups_channels(tmp_path):
    root, _, _ = _dataset(tmp_path, cases=3)
    groups = nnunet_images(root / "imagesTr", 3)
    assert list(groups) == ["case_000", "case_001", "case_002"]
    assert [p.name for p in groups["case_001"]] == [
        "case_001_0000.nii.gz",
        "case_001_0001.nii.gz",
        "case_001_0002.nii.gz",
    ]
    assert all(p.parent == root / "imagesTr" for p in groups["case_002"])


def test_nnunet_images_names_a_missing_channel(tmp_path):
    root, _, _ = _dataset(tmp_path)
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/case_001_0001\.nii\.gz does not exist"):
        nnunet_images(root / "imagesTr", 3)
    with pytest.raises(DataError, match=r"case_000_0002\.nii\.gz is not named CASE_XXXX"):
        nnunet_images(root / "imagesTr", 2)
    (root / "imagesTr" / "stray.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"stray\.nii\.gz is not named CASE_XXXX\.nii\.gz"):
        nnunet_images(root / "imagesTr", 3)
    with pytest.raises(DataError, match=r"imagesTs is not a folder"):
        nnunet_images(root / "imagesTs", 3)
