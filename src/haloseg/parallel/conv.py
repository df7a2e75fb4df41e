"""Partitioned convolution and transposed convolution (modules and functional calls).

The haloed path exchanges the window, convolves it with the image-border zeros added by the
convolution itself, and saves the block and the halo slabs rather than the window (no
activation is held twice; backward rebuilds the window). Stride-1 convolutions that keep the
size take the banded path (``haloseg.parallel.banded``), which needs no window at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from haloseg.geometry import ConvAxis, Geometry, HaloPlan, boundary_bands, trim_padding
from haloseg.parallel.amp import amp_backward, amp_forward, autocast_inputs
from haloseg.parallel.banded import BandedConv, BandedSpec
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.halo import (
    Padding,
    assemble,
    assemble_adjoint,
    exchange,
    memory_format_of,
    return_halo_grads,
    save_halos,
    saved_halos,
)
from haloseg.parallel.site import Layout, Site

__all__ = ["conv_blocks", "conv_transpose_blocks"]


@dataclass(frozen=True)
class _ConvSpec:
    plan: HaloPlan
    padding: Padding
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    crop: tuple[int, ...] | None
    """Transposed only: where this rank's output starts in the window's full output."""
    conv_padding: tuple[int, ...]
    """Zero padding the convolution applies itself (symmetric image-border padding)."""
    out_shape: tuple[int, ...]
    dec: Decomposition


class _HaloConv(torch.autograd.Function):
    """Convolution of the haloed window that saves the block and the halo slabs."""

    @staticmethod
    @amp_forward
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: _ConvSpec
    ) -> torch.Tensor:
        x, weight, bias = autocast_inputs(x, weight, bias)
        received = exchange(x, spec.plan, spec.dec.peers, spec.dec.group)
        out = _run(assemble(x, received, spec.plan, spec.padding), weight, bias, spec)
        ctx.spec, ctx.has_bias, ctx.full_shape = spec, bias is not None, out.shape
        ctx.memory_format = memory_format_of(out)  # PyTorch's pick for (window, weight)
        ctx.cropped = spec.crop is not None and tuple(out.shape[2:]) != spec.out_shape
        if ctx.cropped:
            out = out[_crop_slices(spec)].contiguous(memory_format=ctx.memory_format)
        save_halos(ctx, x, weight, received)
        return out

    @staticmethod
    @amp_backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec = ctx.spec
        x, weight, received = saved_halos(ctx)
        window = assemble(x, received, spec.plan, spec.padding)
        if ctx.cropped:
            full = torch.empty(ctx.full_shape, dtype=grad.dtype, device=grad.device,
                               memory_format=ctx.memory_format).zero_()  # fmt: skip
            full[_crop_slices(spec)] = grad
            grad = full
        n = len(spec.stride)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]  # fmt: skip
        channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=ctx.memory_format), window, weight,
            [channels] if ctx.has_bias else None, spec.stride, spec.conv_padding, spec.dilation,
            spec.transposed, [0] * n, spec.groups, mask,
        )  # fmt: skip
        del window
        gx = None
        if mask[0]:
            gx, pieces = assemble_adjoint(gi, x.shape, spec.plan, spec.padding)
            gx = return_halo_grads(gx, pieces, spec.plan, spec.dec.peers, spec.dec.group)
        return gx, gw, gb if ctx.has_bias else None, None


def _run(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         spec: _ConvSpec) -> torch.Tensor:  # fmt: skip
    n = len(spec.stride)
    return torch.convolution(window, weight, bias, spec.stride, spec.conv_padding, spec.dilation,
                             spec.transposed, [0] * n, spec.groups)  # fmt: skip


def _crop_slices(spec: _ConvSpec) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(c, c + s) for c, s in zip(spec.crop, spec.out_shape)))


def conv_blocks(
    site: Site, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    geometry: Geometry, groups: int,
) -> torch.Tensor:  # fmt: skip
    """A convolution of the geometry ``geometry`` (``haloseg.geometry.ops.conv``) on blocks."""
    n = x.dim() - 2
    if geometry.kind == "pointwise":  # 1x1: also right on replicated (N, C, 1, 1) tensors
        return torch.convolution(x, weight, bias, [1] * n, [0] * n, [1] * n, False, [0] * n,
                                 groups)  # fmt: skip
    layout = site.layout(x, geometry.rules, geometry.periodic)
    rules: list[ConvAxis] = layout.rules  # type: ignore[assignment]
    s, d = tuple(r.stride for r in rules), tuple(r.dilation for r in rules)
    banded = _banded(site, layout, geometry, groups)
    if banded is not None:
        return BandedConv.apply(x, weight, bias, banded)
    plan, conv_padding = layout.plan, (0,) * n
    if geometry.fill == 0.0:
        # Zeros the convolution can add itself need not be copied into the window.
        conv_padding = tuple(min(lo, hi) for lo, hi in plan.pad)
        plan = trim_padding(plan, conv_padding)
    spec = _ConvSpec(plan, geometry.fill, s, d, groups, False, None, conv_padding, (), site.dec)
    return _HaloConv.apply(x, weight, bias, spec)


def _banded(site: Site, layout: Layout, geometry: Geometry, groups: int) -> BandedSpec | None:
    """The banded form, when it applies: stride 1, zero padding of half the span on both
    sides (the size is kept, so even kernels never take it), output blocks equal to input
    blocks, blocks at least two bands thick."""
    plan, rules = layout.plan, layout.rules
    if geometry.fill != 0.0 or geometry.periodic or layout.out_box != plan.local_box:
        return None
    if any(r.stride != 1 or 2 * r.pad_lo != r.span - 1 or r.pad_hi != r.pad_lo for r in rules):
        return None
    widths = [r.pad_lo for r in rules]
    bands = boundary_bands(layout.out_box, [b[-1] for b in layout.in_bounds], widths)
    if bands is None:
        return None
    windows = tuple(
        tuple(r.in_window(a, b) for r, (a, b) in zip(rules, band, strict=True)) for band in bands
    )
    return BandedSpec(plan, tuple(widths), tuple(r.dilation for r in rules), groups,
                      tuple(bands), windows, site.dec)  # fmt: skip


def conv_transpose_blocks(
    site: Site, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    geometry: Geometry, groups: int,
) -> torch.Tensor:  # fmt: skip
    """A transposed convolution of the geometry ``geometry`` on blocks."""
    n = x.dim() - 2
    layout = site.layout(x, geometry.rules)
    rules = layout.rules
    window = layout.plan.window
    crop = tuple(a - (w[0] * r.stride - r.padding)
                 for (a, _), w, r in zip(layout.out_box, window, rules))  # fmt: skip
    out_shape = tuple(b - a for a, b in layout.out_box)
    s, d = tuple(r.stride for r in rules), tuple(r.dilation for r in rules)
    spec = _ConvSpec(layout.plan, 0.0, s, d, groups, True, crop, (0,) * n, out_shape, site.dec)
    return _HaloConv.apply(x, weight, bias, spec)
