"""Medical Segmentation Decathlon datasets: ``dataset.json`` plus NIfTI images and labels.

Images are ``(H, W, D)`` (one channel) or ``(H, W, D, C)`` NIfTI files, channels on the 4th
axis; labels are ``(H, W, D)``. A block is read by slicing nibabel's array proxy, which seeks
to and reads only the bytes of the block in an uncompressed ``.nii``; a ``.nii.gz`` must be
decompressed up to the block's last byte, but only the block is kept in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from haloseg.data._blocks import check_index, image_block, label_block, select_indices
from haloseg.data._nifti import (
    check_case_count,
    check_case_shapes,
    load,
    read_block,
    read_json,
)
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import DataError

__all__ = ["MSDDataset", "write_msd"]


@dataclass(frozen=True)
class _Case:
    """One training case: image and label paths, resolved inside the dataset folder."""

    image: Path
    label: Path


@dataclass(frozen=True)
class _Opened:
    """Headers of one case, checked against each other; data stays on disk."""

    image: Any
    label: Any
    shape: tuple[int, int, int]
    spacing: tuple[float, ...]
    orientation: str


class MSDDataset:
    """The training cases listed in ``root/dataset.json``, read one box at a time.

    ``indices`` picks a subset of the training list (a train/validation split). Headers are
    read on first use of a case, so constructing the dataset in every process is cheap.
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
        self.ignore_label = ignore_label
        spec = _load_spec(self.root / "dataset.json")
        self.in_channels = len(spec["modality"])
        self.num_classes = len(spec["labels"])
        self.channel_names = [spec["modality"][k] for k in sorted(spec["modality"], key=int)]
        self.label_names = [spec["labels"][k] for k in sorted(spec["labels"], key=int)]
        cases = _cases(spec["training"], self.root)
        self._cases = [cases[i] for i in select_indices(indices, len(cases), str(self.root))]
        self._opened: dict[int, _Opened] = {}

    def __len__(self) -> int:
        return len(self._cases)

    def __getstate__(self) -> dict[str, Any]:
        # Each process re-reads headers itself rather than receiving nibabel objects.
        return {**self.__dict__, "_opened": {}}

    def info(self, index: int) -> SampleInfo:
        opened = self._open(index)
        return SampleInfo(name=self._cases[index].image.name, shape=opened.shape,
                          spacing=opened.spacing, orientation=opened.orientation)  # fmt: skip

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        opened = self._open(index)
        case = self._cases[index]
        slices = check_box(box, opened.shape, str(case.image))
        channels = (slice(None),) * (opened.image.ndim - 3)
        image = read_block(opened.image, slices + channels, case.image)
        if image.ndim == 3:
            image = image[None]
        else:
            image = np.moveaxis(image, -1, 0)
        label = read_block(opened.label, slices, case.label)
        return (
            image_block(image, str(case.image)),
            label_block(label, str(case.label), self.num_classes, self.ignore_label),
        )

    def _open(self, index: int) -> _Opened:
        check_index(index, len(self._cases), str(self.root))
        if index not in self._opened:
            self._opened[index] = _open_case(self._cases[index], self.in_channels)
        return self._opened[index]


def _load_spec(path: Path) -> dict[str, Any]:
    """The parsed ``dataset.json``, with the keys the reader needs checked."""
    spec = read_json(
        path,
        missing="point at a Medical Segmentation Decathlon task folder "
        "(the one holding dataset.json, imagesTr and labelsTr)",
        corrupt="restore it from the task archive",
    )
    for key, kind in (("modality", dict), ("labels", dict), ("training", list)):
        if not isinstance(spec.get(key), kind):
            raise DataError(
                f"{path} lacks '{key}' as a JSON {'object' if kind is dict else 'list'}; "
                "restore it from the task archive"
            )
    if not spec["modality"] or not spec["labels"]:
        raise DataError(f"{path} lists no modalities or no labels; expected at least one of each")
    if not spec["training"]:
        raise DataError(f"{path}: dataset.json lists no training cases; add cases to 'training'")
    return spec


def _cases(training: list[Any], root: Path) -> list[_Case]:
    """Image and label path of every training entry, each checked to exist inside ``root``."""
    cases = []
    for number, entry in enumerate(training):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) for key in ("image", "label")
        ):
            raise DataError(
                f"{root / 'dataset.json'}: training entry {number} is {entry!r}; expected "
                '{"image": "./imagesTr/NAME.nii.gz", "label": "./labelsTr/NAME.nii.gz"}'
            )
        cases.append(_Case(_inside(root, entry["image"]), _inside(root, entry["label"])))
    return cases


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing paths that leave ``root`` or do not exist.

    The check is on the normalised path, not the resolved one, so a task folder whose
    ``imagesTr`` is a symlink to shared storage is accepted while ``../x`` is not.
    """
    path = Path(os.path.normpath(root / relative))
    if not path.is_relative_to(os.path.normpath(root)):
        raise DataError(
            f"{root / 'dataset.json'} refers to {relative!r}, which lies outside the dataset "
            f"folder {root}; list paths relative to the folder, like ./imagesTr/x.nii.gz"
        )
    if not path.is_file():
        raise DataError(
            f"{path} does not exist but {root / 'dataset.json'} lists it; restore the file "
            "or remove its entry"
        )
    return path


def _open_case(case: _Case, in_channels: int) -> _Opened:
    """Headers of ``case``, checked: 3-D label, 3-D or 4-D image, same grid, channel count."""
    image, label = load(case.image), load(case.label)
    if image.ndim not in (3, 4):
        raise DataError(
            f"{case.image} has shape {image.shape}; expected (H, W, D) or (H, W, D, channels)"
        )
    if label.ndim != 3:
        raise DataError(f"{case.label} has shape {label.shape}; expected a 3-D (H, W, D) label map")
    if image.shape[:3] != label.shape:
        raise DataError(
            f"{case.image} has spatial shape {image.shape[:3]} but its label {case.label} has "
            f"{label.shape}; resample one onto the other's grid"
        )
    channels = image.shape[3] if image.ndim == 4 else 1
    if channels != in_channels:
        raise DataError(
            f"{case.image} has {channels} channels (4th NIfTI axis) but dataset.json lists "
            f"{in_channels} modalities; fix 'modality' or the image"
        )
    return _Opened(
        image=image.dataobj, label=label.dataobj, shape=label.shape,
        spacing=tuple(float(z) for z in image.header.get_zooms()[:3]),
        orientation="".join(nib.aff2axcodes(image.affine)),
    )  # fmt: skip


def write_msd(
    root: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    modality: list[str],
    labels_names: list[str],
    compress: bool = True,
    affine: np.ndarray | None = None,
) -> Path:
    """Write ``images`` ``(C, H, W, D)`` and ``labels`` ``(H, W, D)`` as an MSD task in ``root``.

    Cases are named ``case_000`` onwards; one-channel images are written 3-D, others 4-D with
    channels last, as in the Decathlon, all with ``affine`` (identity if omitted) as qform
    and sform. Returns the path of ``dataset.json``.
    """
    _check_writable(images, labels, len(modality), len(labels_names))
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if compress else ".nii"
    training = []
    label_dtype = np.uint8 if len(labels_names) <= 256 else np.int16
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"case_{number:03d}{suffix}"
        entry = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
        data = np.asarray(image, dtype=np.float32)
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
        nib.save(_nifti(data, affine), root / entry["image"])
        nib.save(_nifti(np.asarray(label, dtype=label_dtype), affine), root / entry["label"])
        training.append(entry)
    spec = {
        "name": root.name,
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": {str(i): name for i, name in enumerate(modality)},
        "labels": {str(i): name for i, name in enumerate(labels_names)},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(spec, indent=4))
    return path


def _nifti(data: np.ndarray, affine: np.ndarray | None) -> nib.Nifti1Image:
    """``data`` as a NIfTI image whose qform and sform (scanner coordinates, mm) are ``affine``."""
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _check_writable(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channels: int, classes: int
) -> None:
    """Refuse cases ``write_msd`` would write inconsistently with ``dataset.json``."""
    check_case_count(images, labels)
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        check_case_shapes(number, image, label, channels, "modalities")
        if np.size(label) and not 0 <= np.min(label) <= np.max(label) < classes:
            raise DataError(
                f"label {number} holds values {np.min(label)}..{np.max(label)}; expected "
                f"0..{classes - 1} for {classes} label names"
            )
