"""Partitioned interpolation and padding: ``nn.Upsample``/``F.interpolate``, the pad modules,
``F.pad`` and haloseg's ``Crop``.

Interpolation gathers, per output voxel, PyTorch's own source indices and weights
(``haloseg.geometry.ops.interp_axis``) from the haloed window, so nearest and (bi/tri)linear,
both ``align_corners``, by size or scale factor, equal the whole-image call. A ``size`` in a
functional call is read as this block's output size (sizes taken from another block's shape
are): the blocks' sizes are gathered into the global output and its boundaries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from haloseg.geometry import Geometry, Unsupported, ops
from haloseg.parallel.site import Layout, Site

__all__ = ["interpolate_blocks", "pad_blocks"]


def interpolate_blocks(
    site: Site, x: torch.Tensor, geometry: Geometry | None = None, *,
    local_size: Any = None, options: dict[str, Any] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Interpolation of the geometry ``geometry`` (global sizes), or, with ``local_size``,
    to this block's output size with ``options`` (mode, align_corners)."""
    n = x.dim() - 2
    if local_size is None:
        layout = site.layout(x, geometry.rules)
    else:
        layout = site.cached(lambda: _size_layout(site, x, local_size, options or {}))
    window = site.halo(x, layout.plan, 0.0)
    # Gathers and blends run on the window in its memory order ((N, *spatial, C) when it is
    # channels-last): whole rows move at once, and the output keeps the window's layout.
    order = _memory_order(window)
    out = window.permute(order)
    for i, ((a, b), table) in enumerate(zip(layout.out_box, layout.rules, strict=True)):
        d = order.index(2 + i)
        lo0 = layout.plan.window[i][0]
        i0 = torch.tensor(table.lo[a:b], dtype=torch.long, device=x.device) - lo0
        picked = out[(slice(None),) * d + (i0,)]
        if table.weight is not None:
            i1 = torch.tensor(table.hi[a:b], dtype=torch.long, device=x.device) - 1 - lo0
            lam = table.weight[a:b].to(x).view(-1, *([1] * (n + 1 - d)))
            picked = picked * (1 - lam) + out[(slice(None),) * d + (i1,)] * lam
        out = picked
    return out.permute(sorted(range(len(order)), key=order.__getitem__))


def _memory_order(t: torch.Tensor) -> list[int]:
    """The dims of ``t`` from outermost to innermost in memory: (N, *spatial, C) when its
    channels are innermost (channels-last, or a window sliced from such a block), else as
    they come."""
    dims = list(range(t.dim()))
    if t.shape[1] > 1 and t.stride(1) == 1 and math.prod(t.shape[2:]) > 1:
        return [0, *dims[2:], 1]
    return dims


def _size_layout(site: Site, x: torch.Tensor, local_size: Any, options: dict[str, Any]) -> Layout:
    n = x.dim() - 2
    in_bounds = site.dec.bounds_of(x.shape[2:])
    out_bounds = site.dec.bounds_of(ops.tuple_of(local_size, n))
    sizes = [b[-1] for b in out_bounds]
    try:
        geometry = ops.interpolate(n, size=sizes, **options)
    except Unsupported as e:
        raise site.error(str(e)) from None
    rules = geometry.axis_rules([b[-1] for b in in_bounds])
    return site.plan_to(in_bounds, out_bounds, rules)


def pad_blocks(site: Site, x: torch.Tensor, geometry: Geometry, widths: Any = (),
               value: float | None = None) -> torch.Tensor:  # fmt: skip
    """Padding (or cropping) of the spatial axes by ``geometry``
    (``haloseg.geometry.ops.pad``); widths beyond the spatial ones pad channels."""
    n = x.dim() - 2
    if geometry.kind == "local":
        layout = site.layout(x, geometry.rules, geometry.periodic)
        x = site.halo(x, layout.plan, geometry.fill)
    rest = list(widths)[2 * n :]
    if any(rest):
        x = F.pad(x, [0] * (2 * n) + rest, mode="constant", value=value or 0.0)
    return x
