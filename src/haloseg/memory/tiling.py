"""Overlapping tiles against halo exchange at equal device counts, for ``haloseg plan``.

With P devices on an image, halo exchange splits every tensor into P blocks and trades
halos before each layer; overlapping tiles give each device its block plus the network's
receptive field on every side and exchange nothing inside the network (Seal et al., ICPP
2020: 64 tiles of 1250² with a halo of 92). The tiles' price is redundant work,
E = (voxels of all tiles with their halos) / (voxels of the image): about
((n + 2h) / n)^d = 1 + 2dh/n for tiles of side n and halo h, less where halos are cut at
the image border, which is how it is counted here. Their memory is that of the plain
network on one tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from haloseg.geometry import block_boxes
from haloseg.geometry.overlap import overlap_redundancy, tile_box
from haloseg.memory.model import MemoryBreakdown, StepSpec, step_memory
from haloseg.memory.planner import HEADROOM, balanced_grid

__all__ = ["TILES_MAX_REDUNDANCY", "TilingRow", "compare_tiling", "tile_spec", "tiles"]

TILES_MAX_REDUNDANCY = 1.25
"""Tiles are recommended up to this E. Their extra work has to cost less than the halo
exchange it saves: measured on 2 CPU cores with gloo over loopback (docs/benchmarks.md,
overlap-tile training), the exchange took about 12% of the step at 2 ranks and 23% at 4,
so tiles broke even near E = 1.14 and 1.30. Between machines halos cost more and tiles win
at larger E (``haloseg plan --max-redundancy``)."""


@dataclass(frozen=True)
class TilingRow:
    """One device count: the two ways to split the image over it, and the choice."""

    devices: int
    grid: tuple[int, ...]
    tile: tuple[int, ...]
    """Largest tile, its halo included."""
    redundancy: float
    """E: voxels of all tiles over voxels of the (padded) image."""
    halo: MemoryBreakdown
    """Peak per device with halo exchange."""
    tiles: MemoryBreakdown
    """Peak per device with overlapping tiles."""
    choice: str
    """tiles | halo"""
    reason: str


def _padded(image: Sequence[int], align: int, grid: Sequence[int]) -> tuple[int, ...]:
    # As training pads: the next multiple of the alignment that gives every block a unit.
    return tuple(max(math.ceil(n / align), g) * align for n, g in zip(image, grid, strict=True))


def tiles(
    image: Sequence[int], grid: Sequence[int], align: int, halo: Sequence[int]
) -> tuple[tuple[int, ...], float]:
    """(largest tile, E) of ``grid`` tiles of ``image`` with ``halo`` per side, cores split
    as training splits the padded image."""
    padded = _padded(image, align, grid)
    cores = block_boxes(padded, grid, align)
    boxes = [tile_box(c, halo, padded) for c in cores]
    largest = max(boxes, key=lambda b: math.prod(hi - lo for lo, hi in b))
    return tuple(hi - lo for lo, hi in largest), overlap_redundancy(cores, halo, padded)


def tile_spec(spec: StepSpec, tile: Sequence[int]) -> StepSpec:
    """``spec`` as one device of overlapping tiles runs it: the plain network on ``tile``."""
    return replace(spec, image=tuple(tile), grid=None)


def compare_tiling(
    spec: StepSpec,
    halo: Sequence[int],
    device_counts: Sequence[int],
    *,
    nonlocal_reason: str | None = None,
    device_memory: int | None = None,
    max_redundancy: float = TILES_MAX_REDUNDANCY,
) -> list[TilingRow]:
    """Tiles against halo exchange for each count of ``device_counts`` that can split
    ``spec.image``; ``nonlocal_reason``: why the network cannot train on tiles (None: it
    can); tiles are chosen up to ``max_redundancy``."""
    align = 2**spec.depth
    rows = []
    for p in device_counts:
        grid = balanced_grid(spec.image, p, align)
        if grid is None:
            continue
        tile, e = tiles(spec.image, grid, align, halo)
        exchange = step_memory(replace(spec, grid=grid))
        overlap = step_memory(tile_spec(spec, tile))
        limits = (nonlocal_reason, device_memory, max_redundancy)
        choice, reason = _choose(e, exchange, overlap, *limits)
        rows.append(TilingRow(p, grid, tile, e, exchange, overlap, choice, reason))
    return rows


def _choose(
    e: float,
    exchange: MemoryBreakdown,
    overlap: MemoryBreakdown,
    nonlocal_reason: str | None,
    device_memory: int | None,
    max_redundancy: float,
) -> tuple[str, str]:
    if nonlocal_reason is not None:
        return "halo", nonlocal_reason
    if device_memory is not None and overlap.peak > HEADROOM * device_memory:
        if exchange.peak > HEADROOM * device_memory:
            return "halo", "neither fits the device; use more devices"
        return "halo", "a tile with its halo does not fit the device"
    if e > max_redundancy:
        return "halo", f"tiles would compute {e:.2f}x the image's voxels"
    return "tiles", f"{e - 1:.0%} more voxels, no exchange inside the network"
