"""Training's preprocessing replayed on an image file: whole-image statistics gathered by
one streaming pass over chunks, then applied to every tile as it is read.

The statistics are those ``haloseg train`` computes (``haloseg.data.normalize``): per channel,
over every voxel of the image (``zscore``) or its non-zero voxels (``zscore_nonzero``), in
float64. An image larger than memory is read a chunk at a time, so only one chunk is held.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from haloseg.data.normalize import (
    NORMALIZE,
    apply_zscore,
    block_moments,
    normalization_mask,
    zscore_from_moments,
)
from haloseg.errors import ConfigError, DataError

__all__ = [
    "Normalization",
    "chunk_boxes",
    "image_moments",
    "image_statistics",
    "read_checked",
]


@dataclass(frozen=True)
class Normalization:
    """A normalisation scheme and, unless ``none``, the image's mean and std per channel."""

    scheme: str
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    """The model's dtype: float64 models get float64 inputs normalised as training does."""

    @staticmethod
    def from_moments(scheme: str, moments: torch.Tensor) -> Normalization:
        """The normalisation of an image whose summed ``block_moments`` are ``moments``."""
        if scheme == "none":
            return Normalization("none")
        return Normalization(scheme, *zscore_from_moments(moments))

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """``block (C, *spatial)`` of the image, normalised (float32)."""
        if self.scheme == "none":
            return block
        image = torch.from_numpy(np.ascontiguousarray(block, np.float32)).to(self.dtype)
        valid = torch.ones(image.shape[1:], dtype=torch.bool)
        mask = normalization_mask(image, valid, self.scheme)
        return apply_zscore(image, self.mean, self.std, mask).numpy()


def chunk_boxes(shape: Sequence[int], chunk: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Slices of the chunks of ``chunk`` size that cover ``shape`` once."""
    axes = [[slice(lo, min(lo + c, n)) for lo in range(0, n, c)] for n, c in zip(shape, chunk)]
    return (tuple(s) for s in itertools.product(*axes))


def read_checked(image: Any, where: tuple[slice, ...], name: str) -> np.ndarray:
    """``image[:, *where]`` as float32 after refusing NaN or Inf (naming the file)."""
    try:
        block = np.array(image[(slice(None), *where)], np.float32)  # a writable copy
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error) as e:
        # A truncated or corrupt file (nibabel, tifffile's codecs, zarr) fails here, chunk by
        # chunk: a one-line error that every process learns of (``agree``), not a traceback.
        raise DataError(f"{name} is not readable ({e}); re-export or re-download it") from None
    if not np.isfinite(block).all():
        bad = int(block.size - np.isfinite(block).sum())
        raise _non_finite(name, bad)
    return block


def _non_finite(name: str, bad: int) -> DataError:
    return DataError(
        f"{name} holds {bad} NaN or Inf values; replace them (e.g. with 0 or the nodata "
        "value the model was trained with) before inference"
    )


def image_moments(
    image: Any,
    scheme: str,
    chunk: Sequence[int],
    *,
    name: str = "the image",
    part: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """``block_moments`` ``(3, C)`` of ``image (C, *spatial)`` under ``scheme``, summed over
    one pass of ``chunk``-sized pieces, each checked for NaN/Inf. ``part=(k, n)`` reads only
    every n-th piece from the k-th: the share of one of n processes, whose sums add up."""
    if scheme not in NORMALIZE:
        raise ConfigError(f"normalize={scheme!r} is not one of {', '.join(NORMALIZE)}")
    moments = torch.zeros(3, image.shape[0], dtype=torch.float64)
    for where in list(chunk_boxes(tuple(image.shape[1:]), chunk))[part[0] :: part[1]]:
        block = torch.from_numpy(read_checked(image, where, name))
        valid = torch.ones(block.shape[1:], dtype=torch.bool)
        moments += block_moments(block, normalization_mask(block, valid, scheme))
    return moments


def image_statistics(
    image: Any, scheme: str, chunk: Sequence[int], *, name: str = "the image"
) -> Normalization:
    """``scheme``'s whole-image statistics of ``image (C, *spatial)``, from one streaming
    pass over ``chunk``-sized pieces (only one piece in memory at a time)."""
    if scheme == "none":
        return Normalization("none")
    return Normalization.from_moments(scheme, image_moments(image, scheme, chunk, name=name))
