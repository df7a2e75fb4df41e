"""Writing an nnU-Net v2 raw dataset: NIfTI channel files and label maps, and its
``dataset.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from haloseg.data._nifti import check_case_count, check_case_shapes
from haloseg.data._nnunet_files import NIFTI_ENDINGS
from haloseg.data._nnunet_labels import Labels, label_values, parse_labels
from haloseg.errors import DataError

__all__ = ["write_nnunet"]


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
    if file_ending not in NIFTI_ENDINGS:
        raise DataError(f"file_ending is {file_ending!r}; expected one of {NIFTI_ENDINGS}")
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
