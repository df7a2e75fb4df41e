"""The geometry an output carries from its input: where the image lies in the world.

An output keeps its input's place (``read_geometry``) when both are of one kind, so
predictions overlay the image in 3D Slicer, ITK-SNAP or QGIS: NIfTI's affine, qform, sform,
voxel sizes and units; GeoTIFF's georeferencing tags (with the output's own nodata); zarr's
attributes. Of another kind the geometry is lost, and ``lost_geometry`` says so.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import ConfigError, DataError

__all__ = [
    "SUFFIX_KINDS",
    "Geometry",
    "check_nodata",
    "lost_geometry",
    "read_geometry",
    "suffix_of",
    "write_nifti",
    "write_tiff",
]

# The suffixes of images, and the kind of geometry each keeps (None: none).
SUFFIX_KINDS = {
    ".npy": None,
    ".zarr": "zarr",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}
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


def suffix_of(path: Path) -> str:
    """The suffix of ``path`` among ``SUFFIX_KINDS`` (``.nii.gz`` before ``.gz``)."""
    name = path.name.lower()
    for s in sorted(SUFFIX_KINDS, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise ConfigError(f"{path} has none of the suffixes {', '.join(SUFFIX_KINDS)}; rename it")


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
    kind = SUFFIX_KINDS[suffix_of(path)]
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


def lost_geometry(geometry: Geometry | None, path: Path, kind: str | None) -> str | None:
    """The warning an output at ``path`` of ``kind`` owes for the ``geometry`` it cannot
    hold; None when it holds it or there is nothing to hold."""
    if geometry is None or geometry.empty or geometry.kind == kind:
        return None
    return (
        f"the {_KIND_NAMES[geometry.kind]} geometry of {geometry.source} is lost: {path.name} "
        f"cannot hold it; write {_KEEPS[geometry.kind]} to keep it"
    )


def check_nodata(nodata: float | None, dtype: np.dtype) -> None:
    """Raise ``ConfigError`` unless ``nodata`` is None or a value of ``dtype``."""
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


def write_tiff(
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


def write_nifti(path: Path, data: np.ndarray, geometry: Geometry | None, channels: bool) -> None:
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
