"""Inputs and outputs of tiled inference, read and written a box at a time.

Inputs (``open_image``) are presented as ``(C, *spatial)`` arrays whatever the file keeps:
``.npy`` (memory-mapped), ``.zarr`` arrays, TIFF/GeoTIFF (tiles or strips decoded on
demand through tifffile's zarr store; bands first or last), NIfTI (nibabel's proxy;
channels last in 4-D files). Outputs (``create_output``) are written under a temporary name
and renamed when complete: ``.npy`` (memmap) and ``.zarr`` directly, TIFF and NIfTI
converted from a temporary memmap at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import ConfigError, DataError

__all__ = ["Output", "create_output", "open_image", "reopen_output"]

SUFFIXES = (".npy", ".zarr", ".tif", ".tiff", ".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise ConfigError(f"{path} has none of the suffixes {', '.join(SUFFIXES)}; rename it")


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
    suffix = _suffix(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
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

    def __init__(self, path: Path, array: Any, temporary: Path, convert: str | None) -> None:
        self.path, self.array, self.temporary, self.convert = path, array, temporary, convert

    def finish(self) -> Path:
        """Flush, convert if needed, and rename into place."""
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
        if self.convert == "tiff":
            import tifffile

            tile = (256, 256) if data.ndim >= 2 and min(data.shape[-2:]) >= 256 else None
            tifffile.imwrite(staged, data, tile=tile, photometric="minisblack")
        else:
            import nibabel as nib

            array = np.moveaxis(data, 0, -1) if data.ndim == 4 else data
            nib.save(nib.Nifti1Image(array, np.eye(4)), staged)
        os.replace(staged, self.path)
        self.discard()
        return self.path

    def discard(self) -> None:
        if self.temporary.is_dir():
            shutil.rmtree(self.temporary, ignore_errors=True)
        else:
            self.temporary.unlink(missing_ok=True)


def create_output(
    path: str | os.PathLike, shape: Sequence[int], dtype: Any, chunks: Sequence[int] | None = None
) -> Output:
    """An array of ``shape`` to write the result into, saved as ``path`` on ``finish``."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} does not exist; create it first")
    if path.exists():
        raise ConfigError(f"output {path} already exists; remove it or choose another path")
    # A fixed name: every process of a distributed run finds the array rank 0 created.
    temporary = path.with_name(f".{path.name}.tmp")
    if suffix == ".zarr":
        import zarr

        array = zarr.create_array(
            temporary, shape=tuple(shape), dtype=dtype, overwrite=True,
            chunks=tuple(chunks) if chunks else "auto",
        )  # fmt: skip
        return Output(path, array, temporary, None)
    temporary = temporary.with_name(temporary.name + ".npy")
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=tuple(shape))
    convert = {".npy": None, ".tif": "tiff", ".tiff": "tiff"}.get(suffix, "nifti")
    return Output(path, array, temporary, convert)


def reopen_output(output: Output) -> Any:
    """The same output array opened by another process (distributed inference)."""
    if output.temporary.suffix == ".npy":
        return np.load(output.temporary, mmap_mode="r+")
    import zarr

    return zarr.open_array(output.temporary, mode="r+")
