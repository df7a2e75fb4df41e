"""Overlapping tiles: a block (the *core*) grown by a halo on every side and cut at the image
border, and the redundant work a grid of them does.

A tile's network sees zeros beyond the image exactly where the whole image's network does,
so its outputs over the core equal the whole image's as long as the halo covers the
network's receptive field and tile origins stay aligned to its down-sampling factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from haloseg.geometry.blocks import Box, box_volume

__all__ = ["core_slices", "overlap_redundancy", "tile_box"]


def tile_box(core: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    """``core`` grown by ``halo[d]`` on both sides of dim ``d``, cut at ``[0, shape[d])``."""
    return tuple(
        (max(0, lo - h), min(n, hi + h)) for (lo, hi), h, n in zip(core, halo, shape, strict=True)
    )


def core_slices(core: Box, tile: Box) -> tuple[slice, ...]:
    """Where ``core`` sits inside ``tile`` (both in image coordinates)."""
    return tuple(slice(c0 - t0, c1 - t0) for (c0, c1), (t0, _) in zip(core, tile, strict=True))


def overlap_redundancy(cores: Sequence[Box], halo: Sequence[int], shape: Sequence[int]) -> float:
    """Voxels of all tiles (cores with their halos) over the voxels of the image ``shape``:
    the work overlapping tiles do against one pass over the whole image (1 = none extra)."""
    tiles = sum(box_volume(tile_box(c, halo, shape)) for c in cores)
    return tiles / math.prod(shape)
