"""Stride-1 convolution of a block without a haloed copy of it.

The block is convolved in place with the layer's own zero padding; only the thin bands of
outputs next to a neighbour are recomputed from small slabs that hold the halo. In backward,
the input gradient of the block needs no halo at all (it depends on the output gradient and
the weights only), and the halo's share of the weight gradient comes from the same slabs
with the block's cells left at zero. This saves two copies of the block per layer, and the
transient window in forward, against ``_HaloConv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from haloseg.geometry import Box, HaloPlan, intersect, to_local
from haloseg.parallel.amp import amp_backward, amp_forward, autocast_inputs
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.halo import (
    add_incoming,
    box_slices,
    memory_format_of,
    save_halos,
    saved_halos,
    start_exchange,
    start_halo_grads,
)
from haloseg.parallel.transport import wait_all

__all__ = ["BandedConv", "BandedSpec"]


@dataclass(frozen=True)
class BandedSpec:
    plan: HaloPlan
    """The full (untrimmed) exchange plan of the layer."""
    padding: tuple[int, ...]
    """Symmetric zero padding of the layer, per dimension."""
    dilation: tuple[int, ...]
    groups: int
    bands: tuple[Box, ...]
    """Output boxes (global) next to a neighbour, disjoint."""
    windows: tuple[Box, ...]
    """Input window (global) of each band."""
    dec: Decomposition


def _pieces(spec: BandedSpec, window: Box) -> list[tuple[int, Box, Box]]:
    """(piece index, part of the piece, part of the slab) for pieces overlapping ``window``."""
    origin = spec.plan.window
    out = []
    for i, piece in enumerate(spec.plan.recv):
        placed = tuple((o + a, o + b) for (a, b), (o, _) in zip(piece.buffer, origin, strict=True))
        common = intersect(placed, window)
        if common is not None:
            out.append((i, to_local(common, placed), to_local(common, window)))
    return out


def _slab(
    x: torch.Tensor,
    received: list[torch.Tensor | None],
    spec: BandedSpec,
    window: Box,
    with_block: bool,
) -> torch.Tensor:
    """The input ``window`` of a band: halo cells, block cells (or zeros), zeros outside;
    in the block's memory format."""
    shape = (*x.shape[:2], *(hi - lo for lo, hi in window))
    fmt = memory_format_of(x)
    slab = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
    for i, part, dest in _pieces(spec, window):
        piece = spec.plan.recv[i]
        if received[i] is None:
            if not with_block:
                continue
            src = x[
                box_slices(tuple((s0 + a, s0 + b) for (a, b), (s0, _) in zip(part, piece.source)))
            ]
        else:
            src = received[i][box_slices(part)]
        slab[box_slices(dest)] = src
    return slab


def _conv(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, spec: BandedSpec,
          padding: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    n = len(padding)
    return torch.convolution(t, w, b, [1] * n, padding, spec.dilation, False, [0] * n, spec.groups)


class BandedConv(torch.autograd.Function):
    """``x (N, C, *block) -> (N, C', *block)`` for a stride-1, symmetrically zero-padded
    convolution whose output blocks are its input blocks."""

    @staticmethod
    @amp_forward
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        spec: BandedSpec,
    ) -> torch.Tensor:  # fmt: skip
        x, weight, bias = autocast_inputs(x, weight, bias)
        # The block's own convolution needs no halo: it runs while the halo travels.
        received, requests = start_exchange(x, spec.plan, spec.dec.peers, spec.dec.group)
        # In the layout PyTorch's convolution picks for (x, weight), as the plain layer's
        # output: channels-last if either is (a one-channel block is both).
        out = _conv(x, weight, bias, spec, spec.padding)
        wait_all(requests)
        origin = spec.plan.local_box
        for band, window in zip(spec.bands, spec.windows, strict=True):
            slab = _slab(x, received, spec, window, with_block=True)
            out[box_slices(to_local(band, origin))] = _conv(
                slab, weight, bias, spec, (0,) * len(band)
            )
        ctx.spec, ctx.has_bias, ctx.memory_format = spec, bias is not None, memory_format_of(out)
        save_halos(ctx, x, weight, received)
        return out

    @staticmethod
    @amp_backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec = ctx.spec
        x, weight, received = saved_halos(ctx)
        n = len(spec.padding)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        fmt = ctx.memory_format  # the output's: the gradient normally comes in it already
        grad = grad.contiguous(memory_format=fmt)
        # Bands first: their halo gradients travel while the block's own backward runs.
        grad_pieces = [None if r is None else torch.zeros_like(r) for r in received]
        band_gw = []
        origin = spec.plan.local_box
        for band, window in zip(spec.bands, spec.windows, strict=True):
            g_band = grad[box_slices(to_local(band, origin))].contiguous(memory_format=fmt)
            halo_only = _slab(x, received, spec, window, with_block=False)
            g_slab, g_w, _ = torch.ops.aten.convolution_backward(
                g_band, halo_only, weight, None, [1] * n, [0] * n, spec.dilation, False,
                [0] * n, spec.groups, [need_x, need_w, False],
            )  # fmt: skip
            band_gw.append(g_w)
            if need_x:
                for i, part, dest in _pieces(spec, window):
                    if grad_pieces[i] is not None:
                        grad_pieces[i][box_slices(part)] += g_slab[box_slices(dest)]
        incoming, requests = [], []
        if need_x:
            incoming, requests = start_halo_grads(
                x, grad_pieces, spec.plan, spec.dec.peers, spec.dec.group
            )
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, [1] * n, spec.padding, spec.dilation, False, [0] * n,
            spec.groups, [need_x, need_w, need_b],
        )  # fmt: skip
        if need_w:
            for g_w in band_gw:
                gw += g_w
        wait_all(requests)
        if need_x:  # in the layout the convolution's backward picks, as plain PyTorch's
            add_incoming(gx, incoming)
        return gx, gw, gb if ctx.has_bias else None, None
