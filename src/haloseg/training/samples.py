"""This rank's block of one training sample: augmented, padded and normalised consistently
with every other block of the same image, reading only the voxels the block needs.

Augmentation is a permutation of equal-length spatial axes followed by flips, drawn from a
generator seeded by (seed, epoch, sample position), so every rank draws the same one. A
block's voxels in the augmented frame come from one box of the stored image, which the
reader reads; the block is then turned into place. Padding (to a size the network and grid
can split) sits at the high end of each axis and is marked invalid for loss and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from haloseg.data.base import Dataset
from haloseg.data.normalize import (
    apply_zscore,
    block_moments,
    normalization_mask,
    zscore_from_moments,
)
from haloseg.parallel import Decomposition, global_sum

__all__ = ["Augment", "Block", "draw_augment", "padded_shape", "read_block"]

Box = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Augment:
    """``augmented = flip(flips, transpose(perm, image))`` over the spatial axes."""

    perm: tuple[int, ...]
    flips: tuple[bool, ...]

    @staticmethod
    def identity(spatial_dims: int) -> Augment:
        return Augment(tuple(range(spatial_dims)), (False,) * spatial_dims)

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[p] for p in self.perm)

    def source_box(self, box: Box, shape: Sequence[int]) -> list[tuple[int, int]]:
        """The box of the stored image (spatial ``shape``) that ``box`` of the augmented one
        shows."""
        turned = self.shape(shape)
        unflipped = [
            (n - hi, n - lo) if f else (lo, hi)
            for (lo, hi), n, f in zip(box, turned, self.flips, strict=True)
        ]
        source = [(0, 0)] * len(box)
        for d, p in enumerate(self.perm):
            source[p] = unflipped[d]
        return source

    def apply(self, block: np.ndarray) -> np.ndarray:
        """Turn a stored-image block ``(..., *spatial)`` into the augmented frame."""
        lead = block.ndim - len(self.perm)
        block = block.transpose(*range(lead), *(lead + p for p in self.perm))
        flip = [lead + d for d, f in enumerate(self.flips) if f]
        return np.flip(block, flip) if flip else block


def draw_augment(shape: Sequence[int], rng: np.random.Generator) -> Augment:
    """Random flips of every axis, and a random order of the axes that have equal length."""
    perm = list(range(len(shape)))
    for length in set(shape):
        axes = [d for d, n in enumerate(shape) if n == length]
        for d, p in zip(axes, rng.permutation(axes), strict=True):
            perm[d] = int(p)
    flips = tuple(bool(b) for b in rng.integers(0, 2, len(shape)))
    return Augment(tuple(perm), flips)


def padded_shape(shape: Sequence[int], align: int, grid: Sequence[int]) -> tuple[int, ...]:
    """The smallest shape >= ``shape`` that ``grid`` blocks aligned to ``align`` can split."""
    return tuple(max(math.ceil(n / align), g) * align for n, g in zip(shape, grid, strict=True))


@dataclass
class Block:
    """This rank's block of one sample: ``image (C, *block)``, ``label (*block)``, and
    ``valid (*block)`` marking voxels of the image (not padding). In tiles mode ``image``
    is the tile ``(C, *tile)`` around the block, and ``core`` says where the block sits in it."""

    image: torch.Tensor
    label: torch.Tensor
    valid: torch.Tensor
    core: tuple[slice, ...] | None = None
    """The block's slices of the spatial dims of ``image`` (None: ``image`` is the block)."""

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """``t (N, C, *image)`` (the network's output on ``image``) cut to the block."""
        return t if self.core is None else t[(slice(None), slice(None), *self.core)]


def _read_augmented(
    dataset: Dataset, index: int, box: Box, aug: Augment
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The part of ``box`` (augmented, padded frame) inside the image, read and turned."""
    turned = aug.shape(dataset.info(index).shape)
    inside = [(min(lo, n), min(hi, n)) for (lo, hi), n in zip(box, turned, strict=True)]
    image, label = dataset.read(index, aug.source_box(inside, dataset.info(index).shape))
    return aug.apply(image), aug.apply(label), inside


def read_block(
    dataset: Dataset,
    index: int,
    dec: Decomposition,
    padded: Sequence[int],
    aug: Augment,
    normalize: str,
    dtype: torch.dtype,
    ignore_label: int | None = None,
) -> Block:
    """This rank's block of sample ``index`` in the augmented frame padded to ``padded``;
    voxels labelled ``ignore_label`` are marked invalid (left out of loss and metrics)."""
    box = dec.box(padded)
    image, label, inside = _read_augmented(dataset, index, box, aug)
    shape = [hi - lo for lo, hi in box]
    pad = [(0, s - (hi - lo)) for s, (lo, hi) in zip(shape, inside, strict=True)]
    valid = np.pad(np.ones(label.shape, dtype=bool), pad)
    image_t = torch.from_numpy(np.pad(image, [(0, 0), *pad])).to(dtype)
    label_t = torch.from_numpy(np.pad(label, pad).astype(np.int64))
    valid_t = torch.from_numpy(valid)
    if ignore_label is not None:
        # Ignored voxels count as padding for loss and metrics, but not for the statistics
        # of the image, which are those of all its voxels whatever their labels.
        ignored = label_t == ignore_label
        label_t[ignored] = 0
    if normalize != "none":
        image_t = _normalize(image_t, valid_t, dec, normalize)
    if ignore_label is not None:
        valid_t = valid_t & ~ignored
    return Block(image_t, label_t, valid_t)


def _normalize(
    image: torch.Tensor, valid: torch.Tensor, dec: Decomposition, scheme: str
) -> torch.Tensor:
    """Per-channel z-score with mean and standard deviation of the whole image."""
    mask = normalization_mask(image, valid, scheme)
    mean, std = zscore_from_moments(global_sum(block_moments(image, mask), dec))
    return apply_zscore(image, mean, std, mask)
