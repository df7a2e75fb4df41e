"""Write any dataset to disk in one of the formats haloseg reads (``haloseg data synth``).

The output is built in a hidden folder beside the target and renamed into place, so an
interrupted export never leaves a half-written dataset under the target name.
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

__all__ = ["FORMATS", "export_dataset"]

FORMATS = ("zarr", "tiff", "msd")


def _whole(dataset: Dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    shape = dataset.info(index).shape
    return dataset.read(index, [(0, n) for n in shape])


def _write(dataset: Dataset, target: Path, fmt: str) -> None:
    samples = [_whole(dataset, i) for i in range(len(dataset))]
    if fmt == "zarr":
        write_zarr(target, [s[0] for s in samples], [s[1] for s in samples],
                   num_classes=dataset.num_classes)  # fmt: skip
    elif fmt == "tiff":
        label_dtype = np.uint8 if dataset.num_classes <= 256 else np.uint16
        for i, (image, label) in enumerate(samples):
            write_tiff(target / "images" / f"scene_{i:03d}.tif", image)
            write_tiff(target / "labels" / f"scene_{i:03d}.tif", label.astype(label_dtype))
    else:
        write_msd(
            target, [s[0] for s in samples], [s[1] for s in samples],
            modality=[f"channel{c}" for c in range(dataset.in_channels)],
            labels_names=["background", *(f"class{c}" for c in range(1, dataset.num_classes))],
        )  # fmt: skip


def export_dataset(dataset: Dataset, out: str | os.PathLike, fmt: str) -> Path:
    """Write every sample of ``dataset`` to ``out`` as ``fmt`` (zarr | tiff | msd)."""
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
        _write(dataset, partial / "data" if fmt == "zarr" else partial, fmt)
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
