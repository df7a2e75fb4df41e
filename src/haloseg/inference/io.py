"""Inputs and outputs of tiled inference, read and written a box at a time.

Inputs (``open_image``) are presented as ``(C, *spatial)`` arrays whatever the file keeps:
``.npy`` (memory-mapped), ``.zarr`` arrays, TIFF/GeoTIFF (tiles or strips decoded on
demand through tifffile's zarr store, LZW and deflate included; bands first or last), NIfTI
(nibabel's proxy; channels last in 4-D files). Outputs (``create_output``) are written under a
temporary name and renamed when complete: ``.npy`` (memmap) and ``.zarr`` directly, TIFF and
NIfTI converted from a temporary memmap at the end.

An output keeps its input's place in the world (``read_geometry``) when both are of one
kind; ``haloseg.inference.file_geometry`` reads and writes that geometry.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import ConfigError, DataError
from haloseg.inference.file_geometry import (
    SUFFIX_KINDS,
    Geometry,
    check_nodata,
    lost_geometry,
    read_geometry,
    suffix_of,
    write_nifti,
    write_tiff,
)

__all__ = [
    "Geometry",
    "Output",
    "create_output",
    "open_image",
    "read_geometry",
    "reopen_output",
]

log = logging.getLogger(__name__)

SUFFIXES = tuple(SUFFIX_KINDS)


class _Moved:
    """A lazy ``(C, *spatial)`` view of an array whose channel axis is ``axis``."""

    def __init__(self, array: Any, axis: int) -> None:
        self.array, self.axis = array, axis % len(array.shape)
        shape = list(array.shape)
        self.shape = (shape.pop(self.axis), *shape)
        self.dtype = array.dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        channel, *spatial = index
        spatial.insert(self.axis, channel)
        return np.moveaxis(np.asarray(self.array[tuple(spatial)]), self.axis, 0)


class _AddChannel:
    """A ``(1, *spatial)`` view of a one-channel array."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.dtype = array, (1, *array.shape), array.dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        return np.asarray(self.array[index[1:]])[None]


def _raw(path: Path, suffix: str) -> tuple[Any, int]:
    """(array, default channel axis) of the file."""
    if suffix == ".npy":
        return np.load(path, mmap_mode="r"), 0
    if suffix == ".zarr":
        import zarr

        return zarr.open_array(path, mode="r"), 0
    if suffix in (".tif", ".tiff"):
        import tifffile
        import zarr

        tif = tifffile.TiffFile(path)
        axes = tif.series[0].axes
        array = zarr.open_array(tif.aszarr(series=0, level=0), mode="r")
        return array, (-1 if axes.endswith("S") else 0)
    import nibabel as nib

    return nib.load(path).dataobj, -1


def open_image(path: str | os.PathLike, spatial_dims: int, in_channels: int) -> Any:
    """``path`` as a lazily read ``(C, *spatial)`` array for a network of ``spatial_dims``
    and ``in_channels``; the channel axis is the first or last one of that length."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    suffix = suffix_of(path)
    try:
        array, default = _raw(path, suffix)
    except Exception as e:  # noqa: BLE001 - any reader's failure is a bad file
        raise DataError(f"{path} is not a readable {suffix} image ({e})") from None
    ndim = len(array.shape)
    if ndim == spatial_dims and in_channels == 1:
        return _AddChannel(array)
    if ndim == spatial_dims + 1:
        for axis in (default, 0, -1):
            if array.shape[axis] == in_channels:
                return array if axis % ndim == 0 else _Moved(array, axis)
    raise DataError(
        f"{path} has shape {tuple(array.shape)} but the network takes {in_channels} channel(s) "
        f"of {spatial_dims}-D images; give (C, *spatial) or (*spatial, C) with C={in_channels}"
    )


class Output:
    """An output array being written, and how to finish it (atomically) or discard it."""

    def __init__(
        self,
        path: Path,
        array: Any,
        temporary: Path,
        convert: str | None,
        *,
        geometry: Geometry | None = None,
        nodata: float | None = None,
        channels: bool = False,
    ) -> None:
        self.path, self.array, self.temporary, self.convert = path, array, temporary, convert
        self.geometry, self.nodata, self.channels = geometry, nodata, channels

    def finish(self) -> Path:
        """Flush, convert if needed (with the geometry and nodata), and rename into place."""
        try:
            return self._finish()
        except BaseException:
            self.discard()
            raise

    def _finish(self) -> Path:
        if isinstance(self.array, np.memmap):
            self.array.flush()
        if self.convert is None:
            os.replace(self.temporary, self.path)
            return self.path
        staged = self.path.with_name(f".partial-{self.path.name}")  # keeps the suffix
        data = np.load(self.temporary, mmap_mode="r")
        geometry = self.geometry if self.geometry and self.geometry.kind == self.convert else None
        try:
            if self.convert == "tiff":
                write_tiff(staged, data, geometry, self.nodata, self.channels)
            else:
                write_nifti(staged, data, geometry, self.channels)
            os.replace(staged, self.path)
        finally:
            staged.unlink(missing_ok=True)  # gone after the rename; removed after a failure
        self.discard()
        return self.path

    def discard(self) -> None:
        if self.temporary.is_dir():
            shutil.rmtree(self.temporary, ignore_errors=True)
        else:
            self.temporary.unlink(missing_ok=True)


def create_output(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    *,
    geometry: Geometry | None = None,
    nodata: float | None = None,
    channels: bool | None = None,
) -> Output:
    """An array of ``shape`` to write the result into, saved as ``path`` on ``finish``.

    ``geometry``: the input's (``read_geometry``), copied when the output is of its kind and
    otherwise lost with a warning. ``nodata``: the value GIS should read as missing (TIFF
    only; GDAL_NODATA). ``channels``: whether ``shape`` is ``(C, *spatial)`` rather than
    ``(*spatial)``; None guesses from the dtype (floating: probabilities or logits).
    """
    path = Path(path)
    suffix = suffix_of(path)
    if not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} does not exist; create it first")
    if path.exists():
        raise ConfigError(f"output {path} already exists; remove it or choose another path")
    dtype = np.dtype(dtype)
    check_nodata(nodata, dtype)
    kind = SUFFIX_KINDS[suffix]
    if (lost := lost_geometry(geometry, path, kind)) is not None:
        log.warning(lost)
    channels = np.issubdtype(dtype, np.floating) if channels is None else channels
    # A fixed name: every process of a distributed run finds the array rank 0 created.
    temporary = path.with_name(f".{path.name}.tmp")
    if suffix == ".zarr":
        import zarr

        attrs = geometry.zarr_attrs if geometry and geometry.kind == "zarr" else None
        array = zarr.create_array(
            temporary, shape=tuple(shape), dtype=dtype, overwrite=True,
            chunks=tuple(chunks) if chunks else "auto", attributes=attrs,
        )  # fmt: skip
        return Output(path, array, temporary, None)
    temporary = temporary.with_name(temporary.name + ".npy")
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=tuple(shape))
    return Output(path, array, temporary, kind, geometry=geometry, nodata=nodata, channels=channels)


def reopen_output(output: Output) -> Any:
    """The same output array opened by another process (distributed inference); geometry
    and nodata are applied by the process that created it, in ``finish``."""
    if output.temporary.suffix == ".npy":
        return np.load(output.temporary, mmap_mode="r+")
    import zarr

    return zarr.open_array(output.temporary, mode="r+")
