"""Write any dataset to disk in one of the formats haloseg reads (``haloseg data synth``).

The output is built in a hidden folder beside the target and renamed into place, so an
interrupted export never leaves a half-written dataset under the target name. With
``scanner=True`` the files look like real ones: MRI-like raw intensities (channel means
400-1200, zero outside the head) in volumes with a 0.9 x 0.9 x 2.5 mm affine away from the
origin, or 4-band uint16 reflectances in GeoTIFFs georeferenced in UTM 33N (EPSG:32633).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from haloseg.data.base import Dataset
from haloseg.data.msd import write_msd
from haloseg.data.tiff import write_tiff
from haloseg.data.zarr_arrays import write_zarr
from haloseg.errors import ConfigError

__all__ = ["AFFINE", "FORMATS", "GEOTAGS", "export_dataset"]

FORMATS = ("zarr", "tiff", "msd")


def _whole(dataset: Dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    shape = dataset.info(index).shape
    return dataset.read(index, [(0, n) for n in shape])


AFFINE = np.array(
    [[-0.9, 0.0, 0.0, 110.0], [0.0, 0.9, 0.0, -126.0], [0.0, 0.0, 2.5, -72.0], [0, 0, 0, 1]]
)
"""Voxel to scanner (RAS, mm) of the scanner-like volumes: 0.9 x 0.9 x 2.5 mm, x flipped."""

GEOTAGS = {
    33550: (10.0, 10.0, 0.0),  # ModelPixelScale: 10 m pixels
    33922: (0.0, 0.0, 0.0, 500000.0, 4600000.0, 0.0),  # ModelTiepoint: UTM easting, northing
    # GeoKeys: projected, pixel-is-area, EPSG:32633, linear unit metre (EPSG 9001).
    34735: (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633, 3076, 0, 1, 9001),
}
"""GeoTIFF keys of the scanner-like scenes: projected, pixel-is-area, WGS 84 / UTM 33N."""


def _scanner(image: np.ndarray, label: np.ndarray, fmt: str) -> np.ndarray:
    """``image`` (unit-scale synthetic) as raw intensities of ``fmt``'s files."""
    channels = np.arange(image.shape[0]).reshape(-1, *([1] * (image.ndim - 1)))
    if fmt == "tiff":  # reflectances in uint16, one offset per band
        return np.clip(np.rint(image * 300 + 1500 + 400 * channels), 0, 65535).astype(np.uint16)
    mri = np.rint(image * 120 + 400 + 800 * channels / max(1, image.shape[0] - 1))
    # Zero outside an ellipsoidal head, as in skull-stripped MRI (zscore_nonzero's case).
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape[1:]], indexing="ij")
    head = sum(g**2 for g in grids) <= 1.0
    return np.where(head | (label > 0), np.maximum(mri, 1), 0).astype(np.float32)


def _write(dataset: Dataset, target: Path, fmt: str, scanner: bool = False) -> None:
    samples = [_whole(dataset, i) for i in range(len(dataset))]
    if scanner:
        samples = [(_scanner(image, label, fmt), label) for image, label in samples]
    if fmt == "zarr":
        write_zarr(target, [s[0] for s in samples], [s[1] for s in samples],
                   num_classes=dataset.num_classes)  # fmt: skip
    elif fmt == "tiff":
        label_dtype = np.uint8 if dataset.num_classes <= 256 else np.uint16
        for i, (image, label) in enumerate(samples):
            write_tiff(target / "images" / f"scene_{i:03d}.tif", image,
                       geotags=GEOTAGS if scanner else None)  # fmt: skip
            write_tiff(target / "labels" / f"scene_{i:03d}.tif", label.astype(label_dtype),
                       geotags=GEOTAGS if scanner else None)  # fmt: skip
    else:
        write_msd(
            target, [s[0] for s in samples], [s[1] for s in samples],
            modality=[f"channel{c}" for c in range(dataset.in_channels)],
            labels_names=["background", *(f"class{c}" for c in range(1, dataset.num_classes))],
            affine=AFFINE if scanner else None,
        )  # fmt: skip


def export_dataset(
    dataset: Dataset, out: str | os.PathLike, fmt: str, *, scanner: bool = False
) -> Path:
    """Write every sample of ``dataset`` to ``out`` as ``fmt`` (zarr | tiff | msd); with
    ``scanner``, as raw intensities with a real affine or georeference (module docstring)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "tiff" and dataset.spatial_dims != 2:
        raise ConfigError("tiff scenes are 2-D; use --format zarr or msd for 3-D images")
    if fmt == "msd" and dataset.spatial_dims != 3:
        raise ConfigError("MSD (NIfTI) volumes are 3-D; use --format zarr or tiff for 2-D images")
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output path")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write(dataset, partial / "data" if fmt == "zarr" else partial, fmt, scanner)
        if fmt == "zarr":
            os.replace(partial / "data", out)
            partial.rmdir()
        else:
            os.replace(partial, out)
    except OSError as e:
        raise ConfigError(
            f"cannot write {out} ({e.strerror or e}); choose an output path in a writable folder"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
