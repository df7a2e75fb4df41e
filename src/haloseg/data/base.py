"""What every dataset offers: sample shapes, and reading one box of one sample.

Readers never hand out whole images: ``read(index, box)`` returns only the voxels of ``box``
(a half-open ``(lo, hi)`` range per spatial dim), so each rank of a spatial decomposition
reads its own block. Formats that allow it (zarr chunks, TIFF tiles/strips, uncompressed
NIfTI memory-mapped) touch only the bytes of that block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from haloseg.errors import DataError

__all__ = ["Dataset", "SampleInfo", "check_box", "check_finite"]

Box = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class SampleInfo:
    """Shape and origin of one sample."""

    name: str
    """Human-readable id (file name or index), used in error messages and logs."""
    shape: tuple[int, ...]
    """Spatial shape ``(*spatial)`` of image and label."""
    spacing: tuple[float, ...] | None = None
    """Voxel size per spatial dim in the file's units (mm for NIfTI), where the file says."""
    orientation: str | None = None
    """Axis codes of the voxel axes, e.g. ``"RAS"`` (NIfTI), where the file says."""


@runtime_checkable
class Dataset(Protocol):
    """Samples of ``in_channels`` image channels and an integer label map each."""

    spatial_dims: int
    in_channels: int
    num_classes: int

    def __len__(self) -> int: ...

    def info(self, index: int) -> SampleInfo: ...

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``(image (C, *box) float32, label (*box) int64)`` of sample ``index``."""
        ...


def check_box(box: Box, shape: Sequence[int], name: str) -> tuple[slice, ...]:
    """Slices of ``box`` after checking it lies inside ``shape``."""
    if len(box) != len(shape) or any(
        not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape, strict=True)
    ):
        raise DataError(f"box {list(box)} is not inside {name} of shape {tuple(shape)}")
    return tuple(slice(lo, hi) for lo, hi in box)


def check_finite(image: np.ndarray, name: str) -> None:
    """Refuse NaN or Inf in an image block, naming the file."""
    if not np.isfinite(image).all():
        bad = int(np.size(image) - np.isfinite(image).sum())
        raise DataError(
            f"{name} holds {bad} NaN or Inf values; clean or mask the image before training"
        )
