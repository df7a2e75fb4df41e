"""Partitioned pooling: max and average pooling over haloed windows, and global pooling.

Overlapping windows, padding, ceil_mode, count_include_pad and divisor_override behave at the
image border as PyTorch defines them; only the image border pads, never a block's edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from haloseg.geometry import ConvAxis, Geometry
from haloseg.parallel.site import Site

__all__ = ["global_pool_blocks", "pool_blocks"]

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def pool_blocks(
    site: Site, x: torch.Tensor, geometry: Geometry, *, is_max: bool,
    count_include_pad: bool = True, divisor_override: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Max or average pooling of the geometry ``geometry`` (``haloseg.geometry.ops.pool``)."""
    n = x.dim() - 2
    layout = site.layout(x, geometry.rules)
    rules: list[ConvAxis] = layout.rules  # type: ignore[assignment]
    k, s = tuple(r.kernel for r in rules), tuple(r.stride for r in rules)
    window = site.halo(x, layout.plan, geometry.fill)
    if is_max:
        return _MAX[n](window, k, s, 0, tuple(r.dilation for r in rules))
    out = _AVG[n](window, k, s, 0, divisor_override=divisor_override)
    if divisor_override:
        return out
    sizes = [b[-1] for b in layout.in_bounds]
    counted = [(-r.pad_lo, sizes[i] + r.pad_hi) if count_include_pad else (0, sizes[i])
               for i, r in enumerate(rules)]  # fmt: skip
    win = layout.plan.window
    if all(c0 <= lo and hi <= c1 for (lo, hi), (c0, c1) in zip(win, counted)):
        return out
    # Windows reaching past the counted region divide by fewer cells: the share of counted
    # cells in each window is the average pool of a 0/1 mask.
    mask = x.new_zeros((1, 1, *(hi - lo for lo, hi in win)))
    inside = tuple(slice(max(c0 - lo, 0), max(min(c1, hi) - lo, 0))
                   for (lo, hi), (c0, c1) in zip(win, counted))  # fmt: skip
    mask[(0, 0, *inside)] = 1
    return out / _AVG[n](mask, k, s, 0)


def global_pool_blocks(site: Site, x: torch.Tensor, *, is_max: bool) -> torch.Tensor:
    """One value per channel of the whole image, replicated on every rank."""
    from haloseg.parallel.reduce import global_max, global_sum

    dec = site.dec
    if is_max:
        return global_max(x, dec)
    bounds = site.layout(x, [ConvAxis(1)] * (x.dim() - 2)).in_bounds
    total = math.prod(b[-1] for b in bounds)
    spatial = tuple(range(2, x.dim()))
    return global_sum(x.sum(spatial, keepdim=True), dec, replicated=False) / total
