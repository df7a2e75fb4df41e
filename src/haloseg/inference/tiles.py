"""Splitter and merger of exact tiled inference.

The image is padded (conceptually, with zeros at the high end) to a multiple of the
network's alignment, exactly as whole-image inference pads it. Tile cores are aligned
boxes of that image; each tile reads its core plus the halo on every side, cut where the
image ends, so zero padding acts exactly where it acts on the whole image, and the core is
farther than the receptive field from every cut inside the image. The merger keeps cores.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from haloseg.inference.preprocess import read_checked
from haloseg.inference.receptive import ReceptiveField

__all__ = ["Merger", "Tile", "aligned_tile", "plan_tiles", "read_tile"]

log = logging.getLogger(__name__)

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tile:
    """``read``: the input box (core + halo, inside the padded image); ``core``: the output
    box it finalises (inside the real image); ``keep``: the core's slices within the tile."""

    read: Box
    core: Box

    @property
    def keep(self) -> tuple[slice, ...]:
        return tuple(slice(c0 - r0, c1 - r0) for (r0, _), (c0, c1) in zip(self.read, self.core))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.read)


def aligned_tile(tile_size: Sequence[int], alignment: int) -> tuple[int, ...]:
    """``tile_size`` (the core) rounded up to multiples of ``alignment``, saying so if it was
    not one."""
    core = tuple(max(alignment, -(-t // alignment) * alignment) for t in tile_size)
    if core != tuple(tile_size):
        log.warning("tile size %s rounded to %s: tiles must be multiples of the network's "
                    "alignment %d", tuple(tile_size), core, alignment)  # fmt: skip
    return core


def plan_tiles(shape: Sequence[int], core: Sequence[int], rf: ReceptiveField) -> list[Tile]:
    """Tiles covering an image of spatial ``shape`` with aligned cores of ``core``."""
    a = rf.alignment
    padded = [-(-n // a) * a for n in shape]
    axes = []
    for n, p, c, h in zip(shape, padded, core, rf.halo, strict=True):
        cores = [(lo, min(lo + c, p)) for lo in range(0, p, c)]
        axes.append([((max(0, lo - h), min(p, hi + h)), (lo, min(hi, n))) for lo, hi in cores])
    return [
        Tile(tuple(r for r, _ in combo), tuple(c for _, c in combo))
        for combo in itertools.product(*axes)
    ]


def read_tile(
    source: Any,
    tile: Tile,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    name: str = "the image",
) -> np.ndarray:
    """The input of ``tile`` from ``source`` ``(C, *spatial)``: the part inside the image
    (checked for NaN/Inf, then ``transform``-ed: the training preprocessing), zeros beyond
    it (the padding whole-image inference adds)."""
    shape = source.shape[1:]
    inside = tuple((a, min(b, n)) for (a, b), n in zip(tile.read, shape, strict=True))
    block = read_checked(source, tuple(slice(a, b) for a, b in inside), name)
    if transform is not None:
        block = transform(block)
    pad = [(0, 0)] + [(0, (b - a) - (e - s)) for (a, b), (s, e) in zip(tile.read, inside)]
    return np.pad(block, pad) if any(p for _, p in pad) else block


class Merger:
    """Writes tile cores into ``out``: labels ``(*spatial)`` (arg-max, uint8) or scores
    ``(C, *spatial)`` (probabilities or logits, in ``out``'s dtype). ``out`` is anything that
    takes slice assignment: a NumPy array or memmap, a zarr array."""

    def __init__(self, out: Any, mode: str) -> None:
        if mode not in ("labels", "probabilities", "logits"):
            raise ValueError(f"mode={mode!r}")
        self.out, self.mode = out, mode

    def add(self, tile: Tile, logits: np.ndarray) -> None:
        """``logits (C, *tile.shape)`` of one tile."""
        core = logits[(slice(None), *tile.keep)]
        where = tuple(slice(a, b) for a, b in tile.core)
        if self.mode == "labels":
            self.out[where] = core.argmax(0).astype(self.out.dtype)
            return
        if self.mode == "probabilities":
            e = np.exp(core - core.max(0, keepdims=True))
            core = e / e.sum(0, keepdims=True)
        self.out[(slice(None), *where)] = core.astype(self.out.dtype)


def count_voxels(tiles: Sequence[Tile]) -> tuple[int, int]:
    """(voxels computed, voxels kept): their ratio is the cost of the halos."""
    return sum(math.prod(t.shape) for t in tiles), sum(
        math.prod(b - a for a, b in t.core) for t in tiles
    )


def batches(tiles: Sequence[Tile], size: int) -> Iterator[list[Tile]]:
    """Runs of up to ``size`` consecutive tiles of one shape (so they stack)."""
    run: list[Tile] = []
    for t in tiles:
        if run and (len(run) == size or t.shape != run[0].shape):
            yield run
            run = []
        run.append(t)
    if run:
        yield run
