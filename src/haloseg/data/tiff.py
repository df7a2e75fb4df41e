"""Multi-band 2-D scenes in TIFF files, with a label map per scene in a second TIFF file.

Images are ``(H, W)``, ``(bands, H, W)`` (planar) or ``(H, W, bands)`` (contiguous); labels
are ``(H, W)``. Tiled or striped files are read through tifffile's zarr store, which decodes
only the tiles or strips a block intersects; uncompressed files laid out contiguously are
memory-mapped, so a block touches only its own pages.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
import zarr

from haloseg.data._blocks import check_index, image_block, label_block
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import DataError

__all__ = ["TiffDataset", "write_tiff"]

ChannelAxis = Literal["auto", "first", "last"]

# What tifffile raises for a file that is not TIFF, is truncated, or fails to decode (its
# codecs from imagecodecs raise RuntimeError subclasses, e.g. DeflateError, LzwError).
_READ_ERRORS = (tifffile.TiffFileError, OSError, EOFError, ValueError, RuntimeError, zlib.error)

# Open scenes kept per process; each holds a file handle, so this bounds descriptors too.
_MAX_OPEN = 16

_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class _Layout:
    """Where the channels of one image file lie, read from its header."""

    shape: tuple[int, int]
    channels: int
    channel_dim: int | None
    """Dimension of the channels in the stored array, ``None`` for a one-band image."""


class _Opened:
    """Open handles of one scene: arrays that slice without reading the whole file."""

    def __init__(self, image: Path, label: Path) -> None:
        self.files: list[tifffile.TiffFile] = []
        self.image = self._array(image)
        self.label = self._array(label)

    def _array(self, path: Path) -> Any:
        try:
            with tifffile.TiffFile(path) as tif:
                contiguous = tif.series[0].dataoffset is not None
            if contiguous:
                # Uncompressed and laid out in one run: the OS pages in only what a block touches.
                return tifffile.memmap(path, mode="r")
            tif = tifffile.TiffFile(path)
            self.files.append(tif)
            return zarr.open_array(tif.aszarr(series=0, level=0), mode="r")
        except _READ_ERRORS as exc:
            self.close()
            raise _unreadable(path, exc) from exc

    def close(self) -> None:
        for tif in self.files:
            tif.close()


class TiffDataset:
    """Scenes ``images[i]`` with label maps ``labels[i]``, read one box at a time.

    ``channel_axis`` says where the bands of a 3-D image file lie: ``"first"`` (planar,
    ``(bands, H, W)``), ``"last"`` (contiguous, ``(H, W, bands)``) or ``"auto"``, which reads
    it from the file (last if tifffile reports samples last, else first). Headers are read at
    construction, so a missing, corrupt or mismatched file is reported before training.
    """

    spatial_dims = 2

    def __init__(
        self,
        images: Sequence[str | Path],
        labels: Sequence[str | Path],
        *,
        num_classes: int,
        channel_axis: ChannelAxis = "auto",
        ignore_label: int | None = None,
    ) -> None:
        self.ignore_label = ignore_label
        if channel_axis not in ("auto", "first", "last"):
            raise DataError(f"channel_axis {channel_axis!r} is not one of 'auto', 'first', 'last'")
        if num_classes < 2:
            raise DataError(f"num_classes {num_classes} is too small; expected at least 2")
        if not images or len(images) != len(labels):
            raise DataError(
                f"got {len(images)} images and {len(labels)} labels; expected one label file "
                "per image and at least one image"
            )
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels]
        self.num_classes = num_classes
        self._layouts = [
            _check_pair(image, label, channel_axis)
            for image, label in zip(self.images, self.labels, strict=True)
        ]
        self.in_channels = _common_channels(self._layouts, self.images)
        self._opened: OrderedDict[int, _Opened] = OrderedDict()

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        num_classes: int,
        channel_axis: ChannelAxis = "auto",
        ignore_label: int | None = None,
    ) -> TiffDataset:
        """The scenes ``root/images/NAME.tif`` paired with ``root/labels/NAME.tif``."""
        root = Path(root)
        images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in _SUFFIXES)
        if not images:
            raise DataError(
                f"{root / 'images'} holds no .tif or .tiff files; expected scenes in "
                f"{root}/images and their label maps under the same names in {root}/labels"
            )
        labels = [root / "labels" / image.name for image in images]
        for image, label in zip(images, labels, strict=True):
            if not label.is_file():
                raise DataError(
                    f"{image} has no label map; expected {label}; add it or remove the image"
                )
        return cls(images, labels, num_classes=num_classes, channel_axis=channel_axis,
                   ignore_label=ignore_label)  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict[str, Any]:
        # File handles do not cross process boundaries; each process opens its own.
        return {**self.__dict__, "_opened": OrderedDict()}

    def info(self, index: int) -> SampleInfo:
        check_index(index, len(self), "the TIFF dataset")
        return SampleInfo(name=self.images[index].name, shape=self._layouts[index].shape)

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        check_index(index, len(self), "the TIFF dataset")
        image_path, label_path = self.images[index], self.labels[index]
        layout = self._layouts[index]
        rows, cols = check_box(box, layout.shape, str(image_path))
        opened = self._open(index)
        if layout.channel_dim is None:
            image = _read(opened.image, (rows, cols), image_path)[None]
        elif layout.channel_dim == 0:
            image = _read(opened.image, (slice(None), rows, cols), image_path)
        else:
            image = np.moveaxis(_read(opened.image, (rows, cols, slice(None)), image_path), -1, 0)
        label = _read(opened.label, (rows, cols), label_path)
        return (
            image_block(image, str(image_path)),
            label_block(label, str(label_path), self.num_classes, self.ignore_label),
        )

    def close(self) -> None:
        """Close the files this process has open; later reads reopen them."""
        while self._opened:
            self._opened.popitem()[1].close()

    def _open(self, index: int) -> _Opened:
        if index in self._opened:
            self._opened.move_to_end(index)
        else:
            self._opened[index] = _Opened(self.images[index], self.labels[index])
            if len(self._opened) > _MAX_OPEN:
                self._opened.popitem(last=False)[1].close()
        return self._opened[index]


def _header(path: Path) -> tuple[tuple[int, ...], str]:
    """Shape and axes (tifffile's letters) of the first series of ``path``; no pixels read."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the path or the images/labels folders")
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape), tif.series[0].axes
    except (*_READ_ERRORS, IndexError) as exc:
        raise _unreadable(path, exc) from exc


def _check_pair(image: Path, label: Path, channel_axis: ChannelAxis) -> _Layout:
    """Layout of ``image`` after checking ``label`` is a 2-D map of its spatial shape."""
    layout = _layout(image, *_header(image), channel_axis)
    label_shape = _header(label)[0]
    if label_shape != layout.shape:
        raise DataError(
            f"{label} has shape {label_shape} but its image {image} has spatial shape "
            f"{layout.shape}; expected a 2-D label map of the image's height and width"
        )
    return layout


def _layout(path: Path, shape: tuple[int, ...], axes: str, channel_axis: ChannelAxis) -> _Layout:
    """Spatial shape and band count of an image of ``shape`` and ``axes``."""
    if len(shape) == 2:
        return _Layout(shape=shape, channels=1, channel_dim=None)
    if len(shape) != 3:
        raise DataError(
            f"{path} has shape {shape} (axes {axes}); expected (H, W), (bands, H, W) "
            "or (H, W, bands)"
        )
    if channel_axis == "auto":
        channel_axis = "last" if axes.endswith("S") else "first"
    dim = 0 if channel_axis == "first" else 2
    spatial = shape[1:] if dim == 0 else shape[:2]
    return _Layout(shape=spatial, channels=shape[dim], channel_dim=dim)


def _common_channels(layouts: list[_Layout], images: list[Path]) -> int:
    """The band count all images share."""
    first = layouts[0].channels
    for layout, image in zip(layouts, images, strict=True):
        if layout.channels != first:
            raise DataError(
                f"{image} has {layout.channels} bands but {images[0]} has {first}; expected "
                "every scene to have the same bands (check channel_axis if the counts look "
                "like a height or width)"
            )
    return first


def _read(array: Any, slices: tuple[slice, ...], path: Path) -> np.ndarray:
    """``array[slices]``, naming ``path`` if decoding fails (a truncated or corrupt tile)."""
    try:
        return np.asarray(array[slices])
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path} is not a readable TIFF file ({exc}); re-export or re-download it")


def write_tiff(
    path: str | Path,
    array: np.ndarray,
    *,
    tile: tuple[int, int] | None = (256, 256),
    planar: bool = True,
    compress: bool = True,
    geotags: dict[int, tuple] | None = None,
) -> Path:
    """Write ``array`` ``(H, W)`` or ``(bands, H, W)`` as a TIFF file; returns ``path``.

    ``tile`` gives the tile shape (multiples of 16), ``None`` writes strips; ``planar`` stores
    bands as separate planes ``(bands, H, W)``, otherwise interleaved ``(H, W, bands)``;
    ``compress`` uses zlib (an uncompressed striped file is what the reader memory-maps);
    ``geotags`` maps GeoTIFF tag codes (33550 pixel scale, 33922 tie point, 34264
    transformation: doubles; 34735 GeoKey directory: shorts) to their values.
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise DataError(f"array of shape {array.shape} is not (H, W) or (bands, H, W)")
    if tile is not None and any(t <= 0 or t % 16 for t in tile):
        raise DataError(f"tile {tile} is not allowed by TIFF; use multiples of 16, like (256, 256)")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]  # TIFF has no planar layout of one band; the reader sees (H, W)
    if array.ndim == 3 and not planar:
        array = np.moveaxis(array, 0, -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        array,
        photometric="minisblack",
        planarconfig=("separate" if planar else "contig") if array.ndim == 3 else None,
        tile=tile,
        compression="zlib" if compress else None,
        extratags=[(code, "H" if code == 34735 else "d", len(v), tuple(v), True)
                   for code, v in (geotags or {}).items()],
    )  # fmt: skip
    return path
