"""Datasets stored as one zarr group: ``images`` ``(N, C, *spatial)``, ``labels`` ``(N, *spatial)``.

Both arrays are chunked over space, so slicing a block reads and decompresses only the chunks
it intersects. The number of classes lives in the group's ``num_classes`` attribute.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from haloseg.data._blocks import check_index, image_block, label_block, select_indices
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import DataError

__all__ = ["ZarrDataset", "write_zarr"]

# What zarr raises for a missing, truncated or undecodable chunk or metadata document.
_READ_ERRORS = (OSError, ValueError, RuntimeError)


class ZarrDataset:
    """Samples ``indices`` (all when ``None``) of the zarr group at ``path``.

    ``num_classes`` defaults to the group's ``num_classes`` attribute. Array metadata is read
    at construction; chunks are read per block, and the arrays are reopened in each process.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_key: str = "images",
        label_key: str = "labels",
        indices: Sequence[int] | None = None,
        num_classes: int | None = None,
        ignore_label: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.ignore_label = ignore_label
        self.image_key, self.label_key = image_key, label_key
        group = _open_group(self.path)
        images, labels = (_member(group, self.path, key) for key in (image_key, label_key))
        self.spatial_dims = _check_shapes(self.path, images, labels, image_key, label_key)
        self.in_channels = int(images.shape[1])
        self.num_classes = _num_classes(group, self.path, num_classes)
        self._shape = tuple(int(s) for s in labels.shape[1:])
        self._indices = select_indices(indices, int(images.shape[0]), str(self.path))
        self._arrays: tuple[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self._indices)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def info(self, index: int) -> SampleInfo:
        check_index(index, len(self), str(self.path))
        return SampleInfo(name=self._name(index), shape=self._shape)

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        check_index(index, len(self), str(self.path))
        name = self._name(index)
        sample = self._indices[index]
        label_name = f"{self.path}/{self.label_key}[{sample}]"
        slices = check_box(box, self._shape, name)
        if self._arrays is None:
            group = _open_group(self.path)
            self._arrays = (group[self.image_key], group[self.label_key])
        image = _read(self._arrays[0], (sample, slice(None), *slices), name)
        label = _read(self._arrays[1], (sample, *slices), label_name)
        label = label_block(label, label_name, self.num_classes, self.ignore_label)
        return image_block(image, name), label

    def _name(self, index: int) -> str:
        return f"{self.path}/{self.image_key}[{self._indices[index]}]"


def _open_group(path: Path) -> zarr.Group:
    if not path.is_dir():
        raise DataError(f"{path} does not exist; expected a zarr store written by write_zarr")
    try:
        return zarr.open_group(path, mode="r")
    except _READ_ERRORS as exc:
        raise DataError(
            f"{path} is not a readable zarr group ({exc}); expected a store written by write_zarr"
        ) from exc


def _member(group: zarr.Group, path: Path, key: str) -> zarr.Array:
    """The array ``key`` of ``group``, naming the keys it does hold when it is missing."""
    if key not in group or not isinstance(group[key], zarr.Array):
        raise DataError(
            f"{path} has no array {key!r}; it holds {sorted(group.keys())}; pass the right "
            "image_key/label_key or rewrite the store with write_zarr"
        )
    return group[key]


def _check_shapes(
    path: Path, images: zarr.Array, labels: zarr.Array, image_key: str, label_key: str
) -> int:
    """Spatial dims shared by ``images`` ``(N, C, *spatial)`` and ``labels`` ``(N, *spatial)``."""
    if images.ndim not in (4, 5):
        raise DataError(
            f"{path}/{image_key} has shape {images.shape}; expected (N, C, H, W) or (N, C, H, W, D)"
        )
    if labels.shape != images.shape[:1] + images.shape[2:]:
        raise DataError(
            f"{path}/{label_key} has shape {labels.shape} but {path}/{image_key} has "
            f"{images.shape}; expected labels of shape {images.shape[:1] + images.shape[2:]}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{path} holds no samples; write at least one with write_zarr")
    return images.ndim - 2


def _num_classes(group: zarr.Group, path: Path, given: int | None) -> int:
    value = given if given is not None else group.attrs.get("num_classes")
    if value is None:
        raise DataError(
            f"{path} has no 'num_classes' attribute; pass num_classes= or set "
            "group.attrs['num_classes']"
        )
    if not isinstance(value, int) or value < 2:
        raise DataError(f"num_classes {value!r} for {path} is not an integer of at least 2")
    return value


def _read(array: zarr.Array, selection: tuple[Any, ...], name: str) -> np.ndarray:
    """``array[selection]``, naming the sample if a chunk is missing or corrupt."""
    try:
        return np.asarray(array[selection])
    except _READ_ERRORS as exc:
        raise DataError(
            f"{name}: a chunk cannot be read ({exc}); rewrite the store with write_zarr"
        ) from exc


def write_zarr(
    path: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    num_classes: int,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``images`` (each ``(C, *spatial)``) and ``labels`` (each ``(*spatial)``) to ``path``.

    ``chunks`` is the spatial chunk shape (default 256 per side in 2-D, 64 in 3-D); a chunk
    holds all channels of one sample. The store is written next to ``path`` and renamed into
    place, so readers never see half a store.
    """
    image_array, label_array = _stack(images, labels, num_classes)
    spatial = image_array.shape[2:]
    chunks = _chunks(chunks, spatial)
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; delete it or pass overwrite=True")
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    group = zarr.open_group(temporary, mode="w")
    group.attrs["num_classes"] = num_classes
    channels = image_array.shape[1]
    group.create_array("images", data=image_array, chunks=(1, channels, *chunks))
    group.create_array("labels", data=label_array, chunks=(1, *chunks))
    _replace(temporary, path)
    return path


def _stack(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` as ``(N, C, *spatial)`` float32 and ``labels`` as ``(N, *spatial)``, checked."""
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(
            f"got {len(images)} images and {len(labels)} labels; expected the same number, "
            "at least one"
        )
    shapes = {np.shape(image) for image in images}
    if len(shapes) != 1 or len(next(iter(shapes))) not in (3, 4):
        raise DataError(
            f"images have shapes {sorted(shapes)}; expected one shape (C, H, W) or "
            "(C, H, W, D) shared by all (crop or pad them first)"
        )
    image_array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    label_array = np.stack([np.asarray(label) for label in labels])
    if label_array.shape != image_array.shape[:1] + image_array.shape[2:]:
        raise DataError(
            f"labels have shape {label_array.shape[1:]}; expected {image_array.shape[2:]}, "
            "the spatial shape of the images"
        )
    if label_array.size and not 0 <= label_array.min() <= label_array.max() < num_classes:
        raise DataError(
            f"labels hold values {label_array.min()}..{label_array.max()}; expected "
            f"0..{num_classes - 1} for num_classes={num_classes}"
        )
    dtype = np.uint8 if num_classes <= 256 else np.int32
    return image_array, label_array.astype(dtype)


def _chunks(chunks: Sequence[int] | None, spatial: tuple[int, ...]) -> tuple[int, ...]:
    if chunks is None:
        side = 256 if len(spatial) == 2 else 64
        return tuple(min(side, n) for n in spatial)
    if len(chunks) != len(spatial) or any(c < 1 for c in chunks):
        raise DataError(
            f"chunks {tuple(chunks)} do not fit images of spatial shape {spatial}; "
            f"give {len(spatial)} positive sizes"
        )
    return tuple(int(c) for c in chunks)


def _replace(temporary: Path, path: Path) -> None:
    """Move the finished store at ``temporary`` to ``path``, replacing any store there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        temporary.rename(path)
        shutil.rmtree(old)
    else:
        temporary.rename(path)
