"""nnU-Net v2 raw datasets: ``dataset.json``, one NIfTI file per channel, label maps.

A dataset folder holds ``imagesTr/CASE_0000.nii.gz`` .. ``CASE_{C-1:04d}.nii.gz`` (one 3-D file
per channel), ``labelsTr/CASE.nii.gz`` and optionally ``imagesTs``. Cases are the label files,
sorted. As in the Decathlon reader, a block is read by slicing each file's nibabel array
proxy, so only the block is kept in memory. What ``labels`` in dataset.json declares (classes,
regions, the ignore value) is parsed in :mod:`haloseg.data._nnunet_labels`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from haloseg.data._blocks import check_index, image_block, select_indices
from haloseg.data._nifti import (
    check_case_count,
    check_case_shapes,
    load,
    read_block,
    read_json,
)
from haloseg.data._nnunet_labels import Labels, given_ignore, label_values, parse_labels
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import DataError

__all__ = ["NnUNetDataset", "nnunet_images", "write_nnunet"]

log = logging.getLogger(__name__)

# The endings nibabel reads; nnU-Net also allows .png, .tif, .nrrd, ... which this reader does not.
_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class _Case:
    """One training case: its channel files in channel order and its label file."""

    name: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class _Opened:
    """Headers of one case, checked against each other; data stays on disk."""

    images: tuple[Any, ...]
    label: Any
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str


class NnUNetDataset:
    """The training cases of the nnU-Net v2 raw dataset in ``root``, read one box at a time.

    ``indices`` picks a subset of the cases (sorted by name), e.g. a train/validation split.
    ``ignore_label`` supplies the value of unannotated voxels when dataset.json declares no
    ``"ignore"`` (it must agree when it does). Headers are read on first use of a case, so
    constructing the dataset in every process is cheap.
    """

    spatial_dims = 3

    def __init__(
        self,
        root: str | Path,
        *,
        indices: Sequence[int] | None = None,
        ignore_label: int | None = None,
    ) -> None:
        self.root = Path(root)
        path = self.root / "dataset.json"
        spec = _load_spec(path)
        self.file_ending: str = spec["file_ending"]
        self.channel_names = _channel_names(spec["channel_names"], path)
        self.in_channels = len(self.channel_names)
        labels = parse_labels(spec["labels"], spec.get("regions_class_order"), path)
        labels = replace(labels, ignore_label=given_ignore(labels, ignore_label, path))
        self._labels = labels
        self.num_classes = labels.num_classes
        self.label_names = labels.names
        self.regions = labels.regions
        self.ignore_label = labels.ignore_label
        cases = _training_cases(self.root, self.file_ending, self.in_channels)
        _check_count(spec.get("numTraining"), len(cases), path)
        self._cases = [cases[i] for i in select_indices(indices, len(cases), str(self.root))]
        self.case_names = [case.name for case in self._cases]
        self._opened: dict[int, _Opened] = {}

    def __len__(self) -> int:
        return len(self._cases)

    def __getstate__(self) -> dict[str, Any]:
        # Each process re-reads headers itself rather than receiving nibabel objects.
        return {**self.__dict__, "_opened": {}}

    def info(self, index: int) -> SampleInfo:
        opened = self._open(index)
        return SampleInfo(
            name=self._cases[index].name,
            shape=opened.shape,
            spacing=opened.spacing,
            orientation=opened.orientation,
        )

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        opened = self._open(index)
        case = self._cases[index]
        slices = check_box(box, opened.shape, str(case.label))
        image = np.stack(
            [
                image_block(read_block(proxy, slices, path), str(path))
                for proxy, path in zip(opened.images, case.images, strict=True)
            ]
        )
        label = read_block(opened.label, slices, case.label)
        return image, label_values(label, str(case.label), self._labels)

    def _open(self, index: int) -> _Opened:
        check_index(index, len(self._cases), str(self.root))
        if index not in self._opened:
            self._opened[index] = _open_case(self._cases[index])
        return self._opened[index]


def _load_spec(path: Path) -> dict[str, Any]:
    """The parsed ``dataset.json``, with the keys the reader needs checked."""
    spec = read_json(
        path,
        missing="point at an nnU-Net v2 raw dataset folder "
        "(DatasetXXX_Name, the one holding dataset.json, imagesTr and labelsTr)",
        corrupt="fix or regenerate it",
    )
    for key, kind in (("channel_names", dict), ("labels", dict), ("file_ending", str)):
        if not isinstance(spec.get(key), kind):
            raise DataError(f"{path} lacks '{key}' as a JSON {_json_kind(kind)}; {_hint(spec)}")
    if spec["file_ending"] not in _NIFTI_ENDINGS:
        raise DataError(
            f"{path} has file_ending {spec['file_ending']!r}; this reader reads NIfTI "
            f"({' or '.join(_NIFTI_ENDINGS)}); convert the images to NIfTI"
        )
    return spec


def _json_kind(kind: type) -> str:
    return {dict: "object", list: "list", str: "string"}[kind]


def _hint(spec: dict[str, Any]) -> str:
    """How to fix a ``dataset.json`` without an nnU-Net v2 key."""
    if "modality" in spec:
        return (
            "it looks like an nnU-Net v1 / Decathlon dataset ('modality'); read it with "
            "MSDDataset or convert it with nnUNetv2_convert_old_nnUNet_dataset"
        )
    return 'add it, e.g. "channel_names": {"0": "CT"}, "labels": {"background": 0, ...}'


def _channel_names(channels: dict[str, Any], path: Path) -> list[str]:
    """Channel names in channel order, checking the keys are ``"0"`` .. ``"C-1"``."""
    expected = [str(i) for i in range(len(channels))]
    if not channels or set(channels) != set(expected):
        raise DataError(
            f"{path}: channel_names has keys {list(channels)}; expected {expected or ['0']}, "
            "one per channel file _0000, _0001, ..."
        )
    return [str(channels[key]) for key in expected]


def _training_cases(root: Path, file_ending: str, in_channels: int) -> list[_Case]:
    """One case per file of ``labelsTr``, sorted, with its channel files checked to exist."""
    labels = _folder(root / "labelsTr")
    names = sorted(n for n in os.listdir(labels) if _is_data(n, file_ending))
    if not names:
        raise DataError(
            f"{labels} holds no *{file_ending} files; expected one label map per case "
            "(CASE.nii.gz), as dataset.json's file_ending says"
        )
    images = _folder(root / "imagesTr")
    present = set(os.listdir(images))
    cases = []
    for name in names:
        case = name[: -len(file_ending)]
        why = f"dataset.json lists {in_channels} channels (channel_names)"
        fix = f"add the file or remove case {case} from labelsTr"
        paths = _channel_paths(images, case, file_ending, in_channels, present, why, fix)
        cases.append(_Case(case, paths, labels / name))
    return cases


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(
            f"{path} is not a folder; an nnU-Net v2 raw dataset holds imagesTr and labelsTr"
        )
    return path


def _is_data(name: str, file_ending: str) -> bool:
    # Dot files are editor or macOS metadata (._CASE.nii.gz), never cases.
    return name.endswith(file_ending) and not name.startswith(".")


def _channel_paths(
    folder: Path,
    case: str,
    file_ending: str,
    in_channels: int,
    present: set[str],
    why: str,
    fix: str,
) -> tuple[Path, ...]:
    """``folder/CASE_0000<ending>`` .. one per channel, refusing the first that is missing."""
    names = [f"{case}_{channel:04d}{file_ending}" for channel in range(in_channels)]
    for name in names:
        if name not in present:
            raise DataError(f"{folder / name} does not exist but {why}; {fix}")
    return tuple(folder / name for name in names)


def _check_count(expected: Any, found: int, path: Path) -> None:
    if expected is not None and expected != found:
        log.warning(
            "%s says numTraining %s but labelsTr holds %d cases; reading the %d found",
            path,
            expected,
            found,
            found,
        )


def _open_case(case: _Case) -> _Opened:
    """Headers of ``case``, checked: 3-D channel files and label map on one grid."""
    images = [load(path) for path in case.images]
    label = load(case.label)
    for path, image in zip(case.images, images, strict=True):
        if image.ndim != 3:
            raise DataError(
                f"{path} has shape {image.shape}; expected a 3-D (H, W, D) image, one file "
                "per channel"
            )
        if image.shape != images[0].shape:
            raise DataError(
                f"{path} has shape {image.shape} but {case.images[0]} has {images[0].shape}; "
                "the channels of one case must share one grid, resample them"
            )
    if label.shape != images[0].shape:
        raise DataError(
            f"{case.label} has shape {label.shape} but its image {case.images[0]} has "
            f"{images[0].shape}; resample the label onto the image grid"
        )
    zooms = images[0].header.get_zooms()[:3]
    return _Opened(
        images=tuple(image.dataobj for image in images),
        label=label.dataobj,
        shape=images[0].shape,
        spacing=tuple(float(z) for z in zooms),
        orientation="".join(nib.aff2axcodes(images[0].affine)),
    )


def nnunet_images(
    folder: str | Path, in_channels: int, file_ending: str = ".nii.gz"
) -> dict[str, list[Path]]:
    """The channel files of each case in an nnU-Net image folder such as ``imagesTs``.

    Returns ``{case: [CASE_0000<ending>, ..]}`` sorted by case, ``in_channels`` files each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected a folder of CASE_0000{file_ending}")
    if in_channels < 1:
        raise DataError(f"in_channels is {in_channels}; expected at least 1")
    present = {n for n in os.listdir(folder) if _is_data(n, file_ending)}
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}")
    cases: set[str] = set()
    for name in sorted(present):
        match = pattern.fullmatch(name)
        if match is None or int(match[2]) >= in_channels:
            raise DataError(
                f"{folder / name} is not named CASE_XXXX{file_ending} with a channel index "
                f"below {in_channels}; rename it or pass the right in_channels"
            )
        cases.add(match[1])
    if not cases:
        raise DataError(f"{folder} holds no *_0000{file_ending} files; expected nnU-Net images")
    why = f"in_channels is {in_channels}"
    fix = "add the file or remove the case's other channel files"
    return {
        case: list(_channel_paths(folder, case, file_ending, in_channels, present, why, fix))
        for case in sorted(cases)
    }


def write_nnunet(
    root: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    channel_names: Sequence[str],
    labels_spec: Mapping[str, int | list[int]],
    regions_class_order: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    file_ending: str = ".nii.gz",
) -> Path:
    """Write ``images`` ``(C, H, W, D)`` and ``labels`` ``(H, W, D)`` as an nnU-Net v2 dataset.

    Cases are named ``case_000`` onwards; every file gets ``affine`` (identity by default).
    ``labels_spec`` is written as dataset.json's ``labels``. Returns the path of
    ``dataset.json``.
    """
    root = Path(root)
    path = root / "dataset.json"
    if file_ending not in _NIFTI_ENDINGS:
        raise DataError(f"file_ending is {file_ending!r}; expected one of {_NIFTI_ENDINGS}")
    order = None if regions_class_order is None else list(regions_class_order)
    parsed = parse_labels(labels_spec, order, path)
    affine = _affine(affine)
    _check_writable(images, labels, len(channel_names), parsed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    highest = parsed.num_classes - 1 if parsed.ignore_label is None else parsed.ignore_label
    label_dtype = np.uint8 if highest <= 255 else np.int32
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        case = f"case_{number:03d}"
        for channel, data in enumerate(np.asarray(image, dtype=np.float32)):
            file = root / "imagesTr" / f"{case}_{channel:04d}{file_ending}"
            nib.save(nib.Nifti1Image(data, affine), file)
        label_data = np.asarray(label, dtype=label_dtype)
        nib.save(nib.Nifti1Image(label_data, affine), root / "labelsTr" / f"{case}{file_ending}")
    spec: dict[str, Any] = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": dict(labels_spec),
        "numTraining": len(images),
        "file_ending": file_ending,
    }
    if order is not None:
        spec["regions_class_order"] = order
    path.write_text(json.dumps(spec, indent=4))
    return path


def _affine(affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"affine has shape {affine.shape}; expected a (4, 4) voxel-to-world matrix")
    return affine


def _check_writable(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channels: int, parsed: Labels
) -> None:
    """Refuse cases ``write_nnunet`` would write inconsistently with ``dataset.json``."""
    check_case_count(images, labels)
    if channels < 1:
        raise DataError("channel_names is empty; expected one name per channel")
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        check_case_shapes(number, image, label, channels, "channel names")
        label_values(np.asarray(label), f"label {number}", parsed)
