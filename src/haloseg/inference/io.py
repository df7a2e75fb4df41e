"""Inputs and outputs of tiled inference, read and written a box at a time.

Inputs (``open_image``) are presented as ``(C, *spatial)`` arrays whatever the file keeps:
``.npy`` (memory-mapped), ``.zarr`` arrays, TIFF/GeoTIFF (tiles or strips decoded on
demand through tifffile's zarr store, LZW and deflate included; bands first or last), NIfTI
(nibabel's proxy; channels last in 4-D files). Outputs (``create_output``) are written under a
temporary name and renamed when complete: ``.npy`` (memmap) and ``.zarr`` directly, TIFF and
NIfTI converted from a temporary memmap at the end.

An output keeps its input's place in the world (``read_geometry``) when both are of one
kind, so predictions overlay the image in 3D Slicer, ITK-SNAP or QGIS: NIfTI's affine, qform,
sform, voxel sizes and units; GeoTIFF's georeferencing tags; zarr's attributes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import ConfigError, DataError

__all__ = [
    "Geometry",
    "Output",
    "create_output",
    "open_image",
    "read_geometry",
    "reopen_output",
]

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".zarr", ".tif", ".tiff", ".nii", ".nii.gz")
_KINDS = {".npy": None, ".zarr": "zarr", ".tif": "tiff", ".tiff": "tiff"}  # else "nifti"
_KIND_NAMES = {"nifti": "NIfTI", "tiff": "GeoTIFF", "zarr": "zarr attributes"}
_KEEPS = {"nifti": ".nii/.nii.gz", "tiff": ".tif/.tiff", "zarr": ".zarr"}

# GeoTIFF and GDAL tags an output copies, with the TIFF type tifffile writes them as.
_GEOTIFF_TAGS = {
    33550: "d",  # ModelPixelScaleTag
    33922: "d",  # ModelTiepointTag
    34264: "d",  # ModelTransformationTag
    34735: "H",  # GeoKeyDirectoryTag
    34736: "d",  # GeoDoubleParamsTag
    34737: "s",  # GeoAsciiParamsTag
    42112: "s",  # GDAL_METADATA
    42113: "s",  # GDAL_NODATA
}
_GDAL_METADATA, _GDAL_NODATA = 42112, 42113
_TILE = 256  # GDAL's usual tile side; TIFF tiles are multiples of 16


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise ConfigError(f"{path} has none of the suffixes {', '.join(SUFFIXES)}; rename it")


def _kind(suffix: str) -> str | None:
    return _KINDS.get(suffix, "nifti")


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


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in the world, as its file records it: what an output copies."""

    kind: str | None = None
    """``"nifti"``, ``"tiff"`` or ``"zarr"``: the format it was read from; None: nothing."""
    source: str = ""
    """The file it was read from, for messages."""
    nifti_header: Any = None
    """A copy of the input's ``Nifti1Header``/``Nifti2Header`` (affine, codes, zooms, units)."""
    tiff_tags: dict[int, Any] = field(default_factory=dict)
    """GeoTIFF and GDAL tags of the input's first page, by tag code."""
    zarr_attrs: dict[str, Any] = field(default_factory=dict)
    """The input array's attributes."""

    def __post_init__(self) -> None:
        if self.kind not in (None, *_KIND_NAMES):
            raise ConfigError(
                f"geometry kind {self.kind!r} is none of {sorted(_KIND_NAMES)}; use read_geometry"
            )

    @property
    def empty(self) -> bool:
        """True when there is nothing to copy."""
        return self.nifti_header is None and not self.tiff_tags and not self.zarr_attrs


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The geometry of the image at ``path`` (an empty one for ``.npy``)."""
    path = Path(path)
    kind = _kind(_suffix(path))
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if kind is None:
        return Geometry()
    reader = {"nifti": _nifti_geometry, "tiff": _tiff_geometry, "zarr": _zarr_geometry}[kind]
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - any reader's failure is a bad file
        raise DataError(f"{path} is not a readable {_KIND_NAMES[kind]} image ({e})") from None


def _nifti_geometry(path: Path) -> Geometry:
    import nibabel as nib

    return Geometry("nifti", str(path), nifti_header=nib.load(path).header.copy())


def _tiff_geometry(path: Path) -> Geometry:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        found = {code: tags[code].value for code in _GEOTIFF_TAGS if code in tags}
    return Geometry("tiff", str(path), tiff_tags=found)


def _zarr_geometry(path: Path) -> Geometry:
    import zarr

    attrs = zarr.open_array(path, mode="r").attrs.asdict()
    return Geometry("zarr", str(path), zarr_attrs=dict(attrs))


def _warn_if_lost(geometry: Geometry | None, path: Path, kind: str | None) -> None:
    if geometry is None or geometry.empty or geometry.kind == kind:
        return
    log.warning(
        "the %s geometry of %s is lost: %s cannot hold it; write %s to keep it",
        _KIND_NAMES[geometry.kind], geometry.source, path.name, _KEEPS[geometry.kind],
    )  # fmt: skip


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
        if self.convert == "tiff":
            _write_tiff(staged, data, geometry, self.nodata, self.channels)
        else:
            _write_nifti(staged, data, geometry, self.channels)
        os.replace(staged, self.path)
        self.discard()
        return self.path

    def discard(self) -> None:
        if self.temporary.is_dir():
            shutil.rmtree(self.temporary, ignore_errors=True)
        else:
            self.temporary.unlink(missing_ok=True)


def _write_tiff(
    path: Path, data: np.ndarray, geometry: Geometry | None, nodata: float | None, channels: bool
) -> None:
    """Tiled, deflate-compressed; a 2-D multi-band image band by band (as GDAL reads it)."""
    import tifffile

    tile = tuple(min(_TILE, 16 * math.ceil(n / 16)) for n in data.shape[-2:])
    planar = "separate" if channels and data.ndim == 3 else None
    tags = _tiff_extratags(geometry.tiff_tags if geometry else {}, nodata)
    tifffile.imwrite(
        path, data, tile=tile if data.ndim >= 2 else None, compression="zlib",
        photometric="minisblack", planarconfig=planar, extratags=tags,
    )  # fmt: skip


def _tiff_extratags(tags: dict[int, Any], nodata: float | None) -> list[tuple]:
    """tifffile ``extratags`` for the input's georeferencing and the output's nodata: the
    input's nodata and per-band metadata describe its values, not the output's."""
    out = dict(tags)
    out.pop(_GDAL_NODATA, None)
    if _GDAL_METADATA in out:
        out[_GDAL_METADATA] = _dataset_metadata(out[_GDAL_METADATA])
    if nodata is not None:
        out[_GDAL_NODATA] = _nodata_text(nodata)
    return [
        (code, _GEOTIFF_TAGS[code], 0 if _GEOTIFF_TAGS[code] == "s" else len(value), value, True)
        for code, value in sorted(out.items())
        if value is not None
    ]


def _dataset_metadata(xml: str) -> str | None:
    """GDAL_METADATA without its per-band items (scale, offset, band names...)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for item in [i for i in root if "sample" in i.attrib]:
        root.remove(item)
    return ET.tostring(root, encoding="unicode") if len(root) else None


def _nodata_text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _write_nifti(path: Path, data: np.ndarray, geometry: Geometry | None, channels: bool) -> None:
    """Channels last; NIfTI has no float16, so float16 is widened to float32."""
    import nibabel as nib

    array = np.moveaxis(data, 0, -1) if channels else data
    dtype = np.float32 if data.dtype == np.float16 else data.dtype
    if geometry is None:
        image = nib.Nifti1Image(array, np.eye(4))
    else:
        image = _nifti_image(array, geometry.nifti_header, channels)
    image.set_data_dtype(dtype)
    nib.save(image, path)


def _nifti_image(array: np.ndarray, source: Any, channels: bool) -> Any:
    """``array`` in a fresh header carrying ``source``'s affines, codes, zooms and units."""
    import nibabel as nib

    image_class = nib.Nifti2Image if isinstance(source, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(array, source.get_best_affine(), header=type(source)())
    header = image.header
    # Explicitly: the constructor picks its own codes, and set_qform resets the zooms.
    header.set_qform(*source.get_qform(coded=True))
    header.set_sform(*source.get_sform(coded=True))
    spatial = array.ndim - int(channels)
    zooms = tuple(source.get_zooms()[:spatial])
    header.set_zooms(zooms + (1.0,) * (array.ndim - len(zooms)))
    header.set_xyzt_units(*source.get_xyzt_units())
    return image


def _check_nodata(nodata: float | None, dtype: np.dtype) -> None:
    if nodata is None or not np.issubdtype(dtype, np.integer):
        return
    info = np.iinfo(dtype)
    if not (
        math.isfinite(nodata) and float(nodata).is_integer() and info.min <= nodata <= info.max
    ):
        raise ConfigError(
            f"nodata {nodata} is no {dtype} value; give an integer in {info.min}..{info.max} "
            "or None"
        )


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
    suffix = _suffix(path)
    if not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} does not exist; create it first")
    if path.exists():
        raise ConfigError(f"output {path} already exists; remove it or choose another path")
    dtype = np.dtype(dtype)
    _check_nodata(nodata, dtype)
    _warn_if_lost(geometry, path, _kind(suffix))
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
    convert = {".npy": None, ".tif": "tiff", ".tiff": "tiff"}.get(suffix, "nifti")
    return Output(
        path, array, temporary, convert, geometry=geometry, nodata=nodata, channels=channels
    )


def reopen_output(output: Output) -> Any:
    """The same output array opened by another process (distributed inference); geometry
    and nodata are applied by the process that created it, in ``finish``."""
    if output.temporary.suffix == ".npy":
        return np.load(output.temporary, mmap_mode="r+")
    import zarr

    return zarr.open_array(output.temporary, mode="r+")
