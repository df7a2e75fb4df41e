"""Boundary bands: the outputs of a block whose inputs reach into a neighbour's block."""

from __future__ import annotations

from collections.abc import Sequence

from haloseg.geometry.blocks import Box

__all__ = ["boundary_bands"]


def boundary_bands(box: Box, sizes: Sequence[int], widths: Sequence[int]) -> list[Box] | None:
    """Disjoint boxes covering the outputs of ``box`` within ``widths[d]`` of a side that
    has a neighbour (a side inside the image, not on its border).

    Bands are peeled one dimension after another, so corners belong to exactly one band.
    Returns ``None`` when the block is too thin for its bands (thinner than both widths).
    """
    region = list(box)
    bands: list[Box] = []
    for d, ((a, b), n, w) in enumerate(zip(box, sizes, widths, strict=True)):
        if w == 0:
            continue
        if b - a < 2 * w:
            return None
        lo, hi = region[d]
        if a > 0:
            bands.append((*region[:d], (lo, lo + w), *region[d + 1 :]))
            lo += w
        if b < n:
            bands.append((*region[:d], (hi - w, hi), *region[d + 1 :]))
            hi -= w
        region[d] = (lo, hi)
    return bands
