"""Halo exchange plans: which pieces of which ranks' blocks fill each rank's input window.

A rank's *window* is the global input range it needs (from ``rules``); the part outside the
image is padding, filled locally. The plan lists, for every rank, the pieces it receives and
the pieces of its own block it sends, in one canonical order that every rank derives alike,
so point-to-point messages pair up without negotiation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from haloseg.errors import DecompositionError
from haloseg.geometry.blocks import Box, Range, grid_coords, intersect, to_local

__all__ = ["HaloPlan", "Piece", "plan_exchange", "trim_padding"]


@dataclass(frozen=True)
class Piece:
    """One rectangular message: ``peer``'s data, placed at ``buffer`` in the receiver's window.

    In ``HaloPlan.recv`` the peer is the owner and ``source`` is in the owner's local
    coordinates; in ``HaloPlan.send`` the peer is the receiver and ``source`` is in this rank's
    local coordinates.
    """

    peer: int
    buffer: Box
    source: Box


@dataclass(frozen=True)
class HaloPlan:
    """Everything one rank needs to build its haloed input window for one layer."""

    rank: int
    window: Box
    """Global input range this rank needs, padding included."""
    local_box: Box
    """Global range of the block this rank owns."""
    pad: tuple[Range, ...]
    """Per dimension, how far the window reaches outside the image (before, after)."""
    recv: tuple[Piece, ...]
    send: tuple[Piece, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.window)

    @property
    def is_identity(self) -> bool:
        """The window is exactly this rank's block and nobody needs its cells: no message."""
        return self.window == self.local_box and not self.send

    @property
    def is_view(self) -> bool:
        """The window lies inside this rank's block and nobody needs its cells: a slice."""
        return (
            len(self.recv) == 1
            and self.recv[0].peer == self.rank
            and not self.send
            and not any(lo or hi for lo, hi in self.pad)
        )


def trim_padding(plan: HaloPlan, trim: tuple[int, ...]) -> HaloPlan:
    """The plan with ``trim[d]`` cells of out-of-image padding dropped from both ends of
    dimension ``d`` (a convolution pads those itself). Messages do not change."""
    if not any(trim):
        return plan
    window = tuple((lo + t, hi - t) for (lo, hi), t in zip(plan.window, trim, strict=True))
    pad = tuple((lo - t, hi - t) for (lo, hi), t in zip(plan.pad, trim, strict=True))
    recv = tuple(
        Piece(p.peer, tuple((a - t, b - t) for (a, b), t in zip(p.buffer, trim, strict=True)),
              p.source)
        for p in plan.recv
    )  # fmt: skip
    return HaloPlan(plan.rank, window, plan.local_box, pad, recv, plan.send)


def _segments(window: Range, size: int, periodic: bool) -> list[tuple[int, Range]]:
    """Split a window into (buffer offset, in-image range) runs; periodic axes wrap around."""
    lo, hi = window
    if not periodic:
        a, b = max(lo, 0), min(hi, size)
        return [(a - lo, (a, b))] if a < b else []
    runs, pos = [], lo
    while pos < hi:
        k = pos % size
        end = min(hi, pos + size - k)
        runs.append((pos - lo, (k, k + end - pos)))
        pos = end
    return runs


def _pieces(
    window: Box, boxes: Sequence[Box], shape: Sequence[int], periodic: Sequence[bool]
) -> list[tuple[int, Box, Box]]:
    """(owner, buffer box, global box) for every piece of ``window``, in canonical order."""
    per_dim = [_segments(w, n, p) for w, n, p in zip(window, shape, periodic, strict=True)]
    out = []
    for combo in itertools.product(*per_dim):
        region = tuple(rng for _, rng in combo)
        for owner, box in enumerate(boxes):
            common = intersect(region, box)
            if common is None:
                continue
            buf = tuple(
                (off + c0 - r0, off + c1 - r0)
                for (off, (r0, _)), (c0, c1) in zip(combo, common, strict=True)
            )
            out.append((owner, buf, common))
    return out


def plan_exchange(
    rank: int,
    boxes: Sequence[Box],
    windows: Sequence[Box],
    shape: Sequence[int],
    periodic: Sequence[bool] | None = None,
    grid: Sequence[int] | None = None,
) -> HaloPlan:
    """The exchange plan of ``rank``, given every rank's owned box and needed window.

    With ``grid`` given, a window that needs data from a rank that is not a Cartesian
    neighbour (a block thinner than the halo) raises ``DecompositionError``.
    """
    periodic = list(periodic) if periodic is not None else [False] * len(shape)
    all_pieces = [_pieces(w, boxes, shape, periodic) for w in windows]
    mine = all_pieces[rank]
    if grid is not None:
        # Every rank checks every plan, so that all raise together instead of some waiting.
        for r, pieces in enumerate(all_pieces):
            _check_neighbours(r, [owner for owner, _, _ in pieces], grid, periodic)
    recv = tuple(Piece(o, buf, to_local(g, boxes[o])) for o, buf, g in mine)
    send = tuple(
        Piece(q, buf, to_local(g, boxes[rank]))
        for q, pieces in enumerate(all_pieces)
        if q != rank
        for o, buf, g in pieces
        if o == rank
    )
    pad = tuple(
        (0, 0) if p else (max(0, -lo), max(0, hi - n))
        for (lo, hi), n, p in zip(windows[rank], shape, periodic, strict=True)
    )
    return HaloPlan(rank, tuple(windows[rank]), tuple(boxes[rank]), pad, recv, send)


def _check_neighbours(
    rank: int, owners: Sequence[int], grid: Sequence[int], periodic: Sequence[bool]
) -> None:
    me = grid_coords(rank, grid)
    for owner in set(owners):
        them = grid_coords(owner, grid)
        for d, (a, b, g) in enumerate(zip(me, them, grid, strict=True)):
            gap = abs(a - b)
            if periodic[d]:
                gap = min(gap, g - gap)
            if gap > 1:
                raise DecompositionError(
                    f"rank {rank} needs data from rank {owner}, {gap} blocks away along grid "
                    f"axis {d}: its block is thinner than the layer's halo"
                )
