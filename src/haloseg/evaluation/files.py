"""Label-map files and how they pair up: reading a :class:`Volume` (array, spacing, units and
grid) from NIfTI, TIFF/GeoTIFF, ``.npy`` or ``.zarr``, checking that a prediction lies on its
label's grid, and matching the files of two folders case by case."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from haloseg.errors import DataError
from haloseg.evaluation.metrics import RESAMPLE_HINT

__all__ = ["SUFFIXES", "Volume", "check_grids", "pair_cases", "read_volume"]

logger = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii", ".tiff", ".tif", ".npy", ".zarr")
_GEO_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
}
_NIFTI_UNITS = {"meter": "m", "mm": "mm", "micron": "µm", "unknown": "mm"}
_GEO_UNITS = {9001: "m", 9002: "ft", 9003: "US ft"}
_CHANNEL_FILE = re.compile(r"^(.*)_\d{4}$")


@dataclass
class Volume:
    """One file's label map and where its voxels lie."""

    path: Path
    array: np.ndarray
    spacing: tuple[float, ...] | None = None
    units: str = "voxels"
    affine: np.ndarray | None = None
    geo: dict[int, tuple] | None = None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    raise DataError(f"{path} has none of the suffixes {', '.join(SUFFIXES)}; convert or rename it")


def read_volume(path: Path) -> Volume:
    """The label map in ``path`` with its spacing, units and grid where the format has them."""
    suffix = _suffix(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    try:
        if suffix in (".nii", ".nii.gz"):
            return _read_nifti(path)
        if suffix in (".tif", ".tiff"):
            return _read_tiff(path)
        if suffix == ".npy":
            return Volume(path, np.load(path))
        import zarr

        return Volume(path, zarr.open_array(path, mode="r")[...])
    except Exception as e:  # noqa: BLE001 - any reader's failure is a bad file
        raise DataError(f"{path} is not a readable {suffix} file ({e})") from None


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(path)
    array = np.asanyarray(image.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:  # (x, y, z, 1) label maps
        array = array[..., 0]
    norms = np.linalg.norm(image.affine[:3, :3], axis=0)
    unit = _NIFTI_UNITS.get(image.header.get_xyzt_units()[0], "mm")
    spacing = tuple(float(s) for s in norms[: array.ndim]) + (1.0,) * max(array.ndim - 3, 0)
    return Volume(path, array, spacing, unit, affine=np.asarray(image.affine))


def _read_tiff(path: Path) -> Volume:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        array = tif.asarray()
        tags = tif.pages[0].tags
        geo = {
            code: tuple(np.ravel(tags[code].value).tolist()) for code in _GEO_TAGS if code in tags
        }
        units = "map units"
        if tif.is_geotiff:
            code = (tif.geotiff_metadata or {}).get("ProjLinearUnitsGeoKey")
            units = _GEO_UNITS.get(int(code), units) if code is not None else units
    if 33550 not in geo or array.ndim != 2:
        return Volume(path, array, geo=geo or None)
    scale_x, scale_y = geo[33550][:2]  # (x, y, z) scale; rows run along y
    return Volume(path, array, (float(scale_y), float(scale_x)), units, geo=geo)


def check_grids(pred: Volume, label: Volume) -> None:
    """The prediction lies on the label's grid where both files say where they lie."""
    if pred.affine is not None and label.affine is not None:
        if not np.allclose(pred.affine, label.affine, atol=1e-4):
            raise DataError(
                f"prediction {pred.path} and label {label.path} have different NIfTI affines "
                f"({_row(pred.affine)} vs {_row(label.affine)}); {RESAMPLE_HINT}"
            )
    if pred.geo and label.geo:
        for code, name in _GEO_TAGS.items():
            a, b = pred.geo.get(code), label.geo.get(code)
            if (a is None) != (b is None) or (a is not None and not np.allclose(a, b, rtol=1e-9)):
                raise DataError(
                    f"prediction {pred.path} and label {label.path} have different GeoTIFF "
                    f"{name} ({a} vs {b}); {RESAMPLE_HINT}"
                )


def _row(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=4, separator=",").replace("\n", "")


def _case_files(folder: Path) -> dict[str, Path]:
    """Case name -> file of a folder; a dataset folder stands for its ``labelsTr``."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = _suffix_or_none(path)
        if path.name.startswith(".") or suffix is None:
            continue  # hidden, partial or unrelated files (previews, dataset.json)
        stem = path.name[: -len(suffix)]
        if stem in cases:
            raise DataError(
                f"{folder} has two files for case {stem!r} ({cases[stem].name}, "
                f"{path.name}); keep one"
            )
        cases[stem] = path
    if not cases and (folder / "labelsTr").is_dir():
        return _case_files(folder / "labelsTr")
    if not cases:
        raise DataError(f"{folder} holds no {', '.join(SUFFIXES)} files; give a folder of cases")
    return cases


def pair_cases(pred_path: Path, label_path: Path) -> dict[str, tuple[Path, Path]]:
    """Case name -> (prediction, label) of two files or two folders."""
    for path, what in ((pred_path, "prediction"), (label_path, "label")):
        if not path.exists():
            raise DataError(f"{what} path {path} does not exist; check the path")
    folders = [p.is_dir() and _suffix_or_none(p) != ".zarr" for p in (pred_path, label_path)]
    if folders[0] != folders[1]:
        kinds = ["a folder" if f else "a file" for f in folders]
        raise DataError(
            f"prediction {pred_path} is {kinds[0]} but label {label_path} is {kinds[1]}; "
            "give two files or two folders"
        )
    if not folders[0]:
        _suffix(pred_path)  # an unknown suffix is an error here, not in folders
        return {_stem(label_path): (pred_path, label_path)}
    preds, labels = _case_files(pred_path), _case_files(label_path)
    pairs: dict[str, tuple[Path, Path]] = {}
    unmatched = []
    for stem, path in preds.items():
        channel = _CHANNEL_FILE.match(stem)
        case = stem if stem in labels else channel.group(1) if channel else None
        if case not in labels:
            unmatched.append(path.name)
        elif case in pairs:
            raise DataError(
                f"predictions {pairs[case][0].name} and {path.name} both match label "
                f"{labels[case].name}; keep one"
            )
        else:
            pairs[case] = (path, labels[case])
    if unmatched:
        raise DataError(
            f"prediction {unmatched[0]} ({len(unmatched)} in all) has no label in "
            f"{label_path}; name each prediction like its label case"
        )
    if not pairs:
        raise DataError(f"{pred_path} holds no predictions; give the folder haloseg infer wrote")
    missing = [labels[c].name for c in labels if c not in pairs]
    if missing:
        # Evaluating the predictions of a subset (the validation cases) is the usual case.
        logger.info("%d label(s) in %s have no prediction and are not scored, e.g. %s",
                 len(missing), label_path, missing[0])  # fmt: skip
    return pairs


def _suffix_or_none(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.lower().endswith(s)), None)


def _stem(path: Path) -> str:
    return path.name[: -len(_suffix(path))]
