"""nnU-Net v2 raw datasets: ``dataset.json``, one NIfTI file per channel, label maps.

A dataset folder holds ``imagesTr/CASE_0000.nii.gz`` .. ``CASE_{C-1:04d}.nii.gz`` (one 3-D file
per channel), ``labelsTr/CASE.nii.gz`` and optionally ``imagesTs``. Cases are the label files,
sorted. As in the Decathlon reader, a block is read by slicing each file's nibabel array
proxy, so only the block is kept in memory. What ``labels`` in dataset.json declares (classes,
regions, the ignore value) is parsed in :mod:`haloseg.data._nnunet_labels`, the case files
are found in :mod:`haloseg.data._nnunet_files`, and :mod:`haloseg.data._nnunet_write` writes
datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from haloseg.data._blocks import check_index, image_block, select_indices
from haloseg.data._nifti import load, read_block, read_json
from haloseg.data._nnunet_files import NIFTI_ENDINGS, Case, nnunet_images, training_cases
from haloseg.data._nnunet_labels import given_ignore, label_values, parse_labels
from haloseg.data._nnunet_write import write_nnunet
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import DataError

# nnunet_images and write_nnunet live in the _nnunet_files and _nnunet_write modules.
__all__ = ["NnUNetDataset", "nnunet_images", "write_nnunet"]

log = logging.getLogger(__name__)


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
        cases = training_cases(self.root, self.file_ending, self.in_channels)
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
    if spec["file_ending"] not in NIFTI_ENDINGS:
        raise DataError(
            f"{path} has file_ending {spec['file_ending']!r}; this reader reads NIfTI "
            f"({' or '.join(NIFTI_ENDINGS)}); convert the images to NIfTI"
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


def _check_count(expected: Any, found: int, path: Path) -> None:
    if expected is not None and expected != found:
        log.warning(
            "%s says numTraining %s but labelsTr holds %d cases; reading the %d found",
            path,
            expected,
            found,
            found,
        )


def _open_case(case: Case) -> _Opened:
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
