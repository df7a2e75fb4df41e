"""What the Decathlon and nnU-Net formats share: reading ``dataset.json``, NIfTI headers and
blocks, and checking the cases their writers are given.

Every failure becomes a :class:`DataError` that names the file or case and says how to fix it;
the callers supply the wording that depends on the dataset format.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from haloseg.errors import DataError

__all__ = [
    "READ_ERRORS",
    "check_case_count",
    "check_case_shapes",
    "load",
    "read_block",
    "read_json",
    "unreadable",
]

# What nibabel raises for a file that is not NIfTI, is truncated, or fails to decompress.
READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


def read_json(path: Path, *, missing: str, corrupt: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``missing`` and ``corrupt`` are the fixes for its errors."""
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {corrupt}") from exc
    if not isinstance(spec, dict):
        raise DataError(f"{path} holds a {type(spec).__name__}; expected a JSON object")
    return spec


def load(path: Path) -> Any:
    """The nibabel image of ``path``: header parsed, data left on disk."""
    try:
        return nib.load(path)
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc


def read_block(proxy: Any, slices: tuple[slice, ...], path: Path) -> np.ndarray:
    """The voxels of ``slices`` from the array proxy of ``path``, naming it if reading fails."""
    try:
        return np.asarray(proxy[slices])
    except READ_ERRORS as exc:
        raise unreadable(path, exc) from exc


def unreadable(path: Path, exc: Exception) -> DataError:
    """The error for ``path`` failing to parse or read as NIfTI with ``exc``."""
    return DataError(f"{path} is not a readable NIfTI file ({exc}); re-export or re-download it")


def check_case_count(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    """Refuse a writer's cases unless there is one label per image and at least one case."""
    if len(images) != len(labels) or not images:
        raise DataError(
            f"got {len(images)} images and {len(labels)} labels; expected the same number, "
            "at least one"
        )


def check_case_shapes(
    number: int, image: np.ndarray, label: np.ndarray, channels: int, channel_names: str
) -> None:
    """Refuse case ``number`` unless ``image`` is ``(channels, H, W, D)`` and ``label``
    ``(H, W, D)``; ``channel_names`` is what dataset.json calls the channels."""
    if np.ndim(image) != 4 or np.shape(image)[0] != channels:
        raise DataError(
            f"image {number} has shape {np.shape(image)}; expected ({channels}, H, W, D) "
            f"for {channels} {channel_names}"
        )
    if np.shape(label) != np.shape(image)[1:]:
        raise DataError(
            f"label {number} has shape {np.shape(label)}; expected {np.shape(image)[1:]}, "
            "the spatial shape of its image"
        )
