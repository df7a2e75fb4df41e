"""Blocks of an N-D grid: how an extent is split over processes, and who owns what.

A *box* is a tuple of half-open ``(start, stop)`` index ranges, one per spatial dimension.
Ranks are numbered in row-major order over the process grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from haloseg.errors import DecompositionError

__all__ = [
    "Box",
    "Range",
    "block_boxes",
    "box_volume",
    "boxes_from_bounds",
    "grid_coords",
    "grid_rank",
    "intersect",
    "nearest_multiples",
    "split_extent",
    "to_local",
]

Range = tuple[int, int]
Box = tuple[Range, ...]


def split_extent(size: int, parts: int, align: int = 1) -> list[int]:
    """Boundaries ``[0, c1, ..., size]`` splitting ``size`` into ``parts`` near-equal pieces.

    Interior boundaries are multiples of ``align``; earlier pieces take the remainder, so blocks
    may be uneven. Raises ``DecompositionError`` when ``size`` cannot give every part one
    aligned unit.
    """
    if parts < 1:
        raise DecompositionError(f"parts={parts} must be >= 1")
    if size % align:
        lo, hi = nearest_multiples(size, align)
        raise DecompositionError(
            f"size {size} is not a multiple of the network's down-sampling factor {align}; "
            f"use {lo} or {hi}"
        )
    units = size // align
    if units < parts:
        raise DecompositionError(
            f"size {size} is smaller than {parts} blocks x alignment {align} = {parts * align}; "
            f"use a size of at least {parts * align} or fewer blocks along this axis"
        )
    base, extra = divmod(units, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + (base + (p < extra)) * align)
    return bounds


def nearest_multiples(size: int, align: int) -> tuple[int, int]:
    """The multiples of ``align`` just below (at least ``align``) and just above ``size``."""
    lo = max(align, size // align * align)
    return lo, -(-size // align) * align


def grid_coords(rank: int, grid: Sequence[int]) -> tuple[int, ...]:
    """Row-major coordinates of ``rank`` in ``grid``."""
    coords = []
    for extent in reversed(grid):
        rank, c = divmod(rank, extent)
        coords.append(c)
    return tuple(reversed(coords))


def grid_rank(coords: Sequence[int], grid: Sequence[int]) -> int:
    """Row-major rank of ``coords`` in ``grid``."""
    rank = 0
    for c, extent in zip(coords, grid, strict=True):
        rank = rank * extent + c
    return rank


def boxes_from_bounds(bounds: Sequence[Sequence[int]]) -> list[Box]:
    """Boxes of every rank (row-major) from per-axis boundaries ``[0, c1, ..., size]``."""
    grid = [len(b) - 1 for b in bounds]
    boxes = []
    for coords in itertools.product(*(range(g) for g in grid)):
        boxes.append(tuple((bounds[d][c], bounds[d][c + 1]) for d, c in enumerate(coords)))
    return boxes


def block_boxes(shape: Sequence[int], grid: Sequence[int], align: int = 1) -> list[Box]:
    """Boxes of every rank when ``shape`` is split over ``grid`` with ``align``-ed boundaries."""
    if len(shape) != len(grid):
        raise DecompositionError(
            f"grid {tuple(grid)} has {len(grid)} axes but the image has {len(shape)} spatial "
            f"dimensions {tuple(shape)}; give one grid extent per spatial dimension"
        )
    return boxes_from_bounds([split_extent(n, g, align) for n, g in zip(shape, grid)])


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or ``None`` when they do not overlap."""
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def to_local(box: Box, origin: Box) -> Box:
    """``box`` in the coordinates of a box starting at ``origin``'s starts."""
    return tuple((a - o, b - o) for (a, b), (o, _) in zip(box, origin, strict=True))


def box_volume(box: Box) -> int:
    """Number of elements in ``box``."""
    return math.prod(hi - lo for lo, hi in box)
