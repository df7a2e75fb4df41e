"""Partitioned layers: mixins that give a PyTorch layer an exact forward on local blocks.

``spatial_parallel`` swaps a layer's class for ``(Mixin, OriginalClass)``, so parameters,
buffers, ``state_dict`` keys and ``isinstance`` checks stay those of the original layer.
Each mixin turns the layer's arguments into per-axis window rules (``haloseg.geometry``),
asks for the exchange plan of this rank, and runs the original operation on the haloed
window with its padding removed (the padding is applied at the image border only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from haloseg.errors import DecompositionError, UnsupportedLayerError
from haloseg.geometry import (
    AxisRule,
    Box,
    ConvAxis,
    HaloPlan,
    IndexAxis,
    TransposedConvAxis,
    boundary_bands,
    boxes_from_bounds,
    out_bounds,
    plan_exchange,
    same_padding,
    trim_padding,
)
from haloseg.parallel.banded import BandedConv, BandedSpec
from haloseg.parallel.comm import (
    HaloExchange,
    Padding,
    _amp_backward,
    _amp_forward,
    assemble,
    assemble_adjoint,
    autocast_inputs,
    box_slices,
    exchange,
    return_halo_grads,
    save_halos,
    saved_halos,
)
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.norm import GlobalNormalize, global_moments

__all__ = ["LayerContext", "Partitioned"]


@dataclass
class LayerContext:
    """What a partitioned layer knows about its place: the decomposition and its own name."""

    dec: Decomposition
    path: str
    stats: Decomposition | None = None
    """Wider group of BatchNorm's batch statistics (all data replicas), when there is one."""
    forward_id: int = -1
    calls: int = 0
    cache: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Where this rank's block sits in a layer's input and output."""

    plan: HaloPlan
    in_bounds: list[list[int]]
    out_box: Box
    rules: list[AxisRule]


_CACHE_LIMIT = 64
"""Plans kept per layer (one per image layout and call within a forward)."""


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class Partitioned:
    """Base of the partitioned-layer mixins."""

    _hs: LayerContext

    @property
    def _kind(self) -> str:
        return next(c for c in type(self).__mro__ if not issubclass(c, Partitioned)).__name__

    def _error(self, reason: str) -> DecompositionError:
        return DecompositionError(f"layer '{self._hs.path}' ({self._kind}): {reason}")

    def _layout(
        self,
        x: torch.Tensor,
        rules: list[AxisRule] | Callable[[list[int]], list[AxisRule]],
        periodic: list[bool] | None = None,
    ) -> Layout:
        """This rank's plan for ``x``; cached per call while a root forward is running.

        ``rules`` may be a function of the global input sizes (interpolation tables).
        """
        ctx, dec = self._hs, self._hs.dec
        if ctx.forward_id != dec.forward_id:
            ctx.forward_id, ctx.calls = dec.forward_id, 0
        key = (dec.forward_key, ctx.calls)
        ctx.calls += 1
        if dec.forward_key is not None and key in ctx.cache:
            return ctx.cache[key]
        in_bounds = dec.bounds_of(x.shape[2:])
        if callable(rules):
            rules = rules([b[-1] for b in in_bounds])
        periodic = periodic if periodic is not None else [False] * len(rules)
        layout = self._plan(in_bounds, rules, periodic)
        if dec.forward_key is not None:
            if len(ctx.cache) >= _CACHE_LIMIT:  # many image sizes: start afresh
                ctx.cache.clear()
            ctx.cache[key] = layout
        return layout

    def _plan(
        self, in_bounds: list[list[int]], rules: list[AxisRule], periodic: list[bool]
    ) -> Layout:
        dec = self._hs.dec
        try:
            outs = [out_bounds(b, r) for b, r in zip(in_bounds, rules, strict=True)]
        except DecompositionError as e:
            raise self._error(str(e)) from None
        for d, b in enumerate(outs):
            thin = [i for i in range(len(b) - 1) if b[i + 1] <= b[i]]
            if thin and b[-1] > 0:
                raise self._error(
                    f"its output of size {b[-1]} along dimension {d} leaves block {thin[0]} of "
                    f"the grid {dec.grid} empty (boundaries {b}); use a coarser grid or a "
                    "larger image"
                )
        out_boxes = boxes_from_bounds(outs)
        windows = [
            tuple(r.in_window(a, b) for r, (a, b) in zip(rules, box, strict=True))
            for box in out_boxes
        ]
        shape = [b[-1] for b in in_bounds]
        try:
            plan = plan_exchange(
                dec.rank, boxes_from_bounds(in_bounds), windows, shape, periodic, dec.grid
            )
        except DecompositionError as e:
            sizes = [[b[i + 1] - b[i] for i in range(len(b) - 1)] for b in in_bounds]
            raise self._error(
                f"{e} (input blocks {sizes} per axis, window {windows[dec.rank]}); use a "
                "coarser grid or a larger image"
            ) from None
        return Layout(plan, in_bounds, out_boxes[dec.rank], rules)

    def _halo(self, x: torch.Tensor, plan: HaloPlan, padding: Padding) -> torch.Tensor:
        """The haloed window of ``x`` (differentiable)."""
        if plan.is_identity:
            return x
        if plan.is_view:
            return x[box_slices(plan.recv[0].source)]
        dec = self._hs.dec
        return HaloExchange.apply(x, plan, padding, dec.peers, dec.group)


# ----------------------------------------------------------------------------- convolutions


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
    """Convolution of the haloed window that saves the block and the halo slabs, not the
    window: no activation is held twice. The window is rebuilt in backward (a copy)."""

    @staticmethod
    @_amp_forward
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: _ConvSpec
    ) -> torch.Tensor:
        x, weight, bias = autocast_inputs(x, weight, bias)
        received = exchange(x, spec.plan, spec.dec.peers, spec.dec.group)
        out = _run_conv(assemble(x, received, spec.plan, spec.padding), weight, bias, spec)
        ctx.spec, ctx.has_bias, ctx.full_shape = spec, bias is not None, out.shape
        if spec.crop is not None:
            out = _crop(out, spec)
        save_halos(ctx, x, weight, received)
        return out

    @staticmethod
    @_amp_backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec = ctx.spec
        x, weight, received = saved_halos(ctx)
        window = assemble(x, received, spec.plan, spec.padding)
        if spec.crop is not None:
            full = grad.new_zeros(ctx.full_shape)
            full[_crop_slices(spec)] = grad
            grad = full
        n = len(spec.stride)
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(),
            window,
            weight,
            [weight.shape[0] if not spec.transposed else weight.shape[1] * spec.groups]
            if ctx.has_bias
            else None,
            spec.stride,
            spec.conv_padding,
            spec.dilation,
            spec.transposed,
            [0] * n,
            spec.groups,
            mask,
        )
        del window
        gx = None
        if mask[0]:
            gx, pieces = assemble_adjoint(gi, x.shape, spec.plan, spec.padding)
            gx = return_halo_grads(gx, pieces, spec.plan, spec.dec.peers, spec.dec.group)
        return gx, gw, gb if ctx.has_bias else None, None


def _run_conv(
    window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: _ConvSpec
) -> torch.Tensor:
    n = len(spec.stride)
    return torch.convolution(
        window,
        weight,
        bias,
        spec.stride,
        spec.conv_padding,
        spec.dilation,
        spec.transposed,
        [0] * n,
        spec.groups,
    )


def _crop_slices(spec: _ConvSpec) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(c, c + s) for c, s in zip(spec.crop, spec.out_shape)))


def _crop(out: torch.Tensor, spec: _ConvSpec) -> torch.Tensor:
    if tuple(out.shape[2:]) == spec.out_shape:
        return out
    return out[_crop_slices(spec)].contiguous()


class PartitionedConv(Partitioned):
    """``nn.ConvNd`` on blocks: any kernel, stride, dilation, groups, padding (incl. 'same')
    and padding_mode (zeros, reflect, replicate, circular)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        k, s, d = _tuple(self.kernel_size, n), _tuple(self.stride, n), _tuple(self.dilation, n)
        if self.padding == "same":
            pads = [same_padding(k[i], d[i]) for i in range(n)]
        elif self.padding == "valid":
            pads = [(0, 0)] * n
        else:
            pads = [(p, p) for p in _tuple(self.padding, n)]
        rules = [ConvAxis(k[i], s[i], *pads[i], d[i]) for i in range(n)]
        circular = self.padding_mode == "circular"
        periodic = [circular and pads[i] != (0, 0) for i in range(n)]
        fill: Padding = 0.0 if self.padding_mode in ("zeros", "circular") else self.padding_mode
        layout = self._layout(x, rules, periodic)
        banded = self._banded(layout, pads, s, d, fill)
        if banded is not None:
            return BandedConv.apply(x, self.weight, self.bias, banded)
        plan, conv_padding = layout.plan, (0,) * n
        if fill == 0.0:
            # Zeros the convolution can add itself need not be copied into the window.
            conv_padding = tuple(min(lo, hi) for lo, hi in plan.pad)
            plan = trim_padding(plan, conv_padding)
        spec = _ConvSpec(plan, fill, s, d, self.groups, False, None, conv_padding, (),
                         self._hs.dec)  # fmt: skip
        return _HaloConv.apply(x, self.weight, self.bias, spec)

    def _banded(
        self,
        layout: Layout,
        pads: list[tuple[int, int]],
        stride: tuple[int, ...],
        dilation: tuple[int, ...],
        fill: Padding,
    ) -> BandedSpec | None:
        """The banded form of this layer, when it applies: stride 1, symmetric zero
        padding, output blocks equal to input blocks, blocks at least two bands thick."""
        plan = layout.plan
        if fill != 0.0 or any(s != 1 for s in stride) or any(lo != hi for lo, hi in pads):
            return None
        if self.padding_mode != "zeros" or layout.out_box != plan.local_box:
            return None
        sizes = [b[-1] for b in layout.in_bounds]
        widths = [lo for lo, _ in pads]
        bands = boundary_bands(layout.out_box, sizes, widths)
        if bands is None:
            return None
        windows = tuple(
            tuple(r.in_window(a, b) for r, (a, b) in zip(layout.rules, band, strict=True))
            for band in bands
        )
        return BandedSpec(plan, tuple(widths), dilation, self.groups, tuple(bands), windows,
                          self._hs.dec)  # fmt: skip


class PartitionedConvTranspose(Partitioned):
    """``nn.ConvTransposeNd`` on blocks: any kernel, stride, padding, output_padding."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            raise UnsupportedLayerError(
                f"layer '{self._hs.path}': output_size= in a partitioned transposed convolution "
                "is not supported; set output_padding on the layer instead"
            )
        n = x.dim() - 2
        k, s, d = _tuple(self.kernel_size, n), _tuple(self.stride, n), _tuple(self.dilation, n)
        p, op = _tuple(self.padding, n), _tuple(self.output_padding, n)
        rules = [TransposedConvAxis(k[i], s[i], p[i], op[i], d[i]) for i in range(n)]
        layout = self._layout(x, rules, [False] * n)
        window = layout.plan.window
        crop = tuple(
            a - (w[0] * s[i] - p[i]) for i, ((a, _), w) in enumerate(zip(layout.out_box, window))
        )
        out_shape = tuple(b - a for a, b in layout.out_box)
        spec = _ConvSpec(layout.plan, 0.0, s, d, self.groups, True, crop, (0,) * n, out_shape,
                         self._hs.dec)  # fmt: skip
        return _HaloConv.apply(x, self.weight, self.bias, spec)


# ---------------------------------------------------------------------------------- pooling


class PartitionedPool(Partitioned):
    """``nn.MaxPoolNd`` / ``nn.AvgPoolNd``: overlapping windows, padding, ceil_mode,
    count_include_pad and divisor_override, all as PyTorch defines them at the border."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        is_max = isinstance(self, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
        k = _tuple(self.kernel_size, n)
        s = _tuple(self.stride if self.stride is not None else self.kernel_size, n)
        p = _tuple(self.padding, n)
        d = _tuple(self.dilation, n) if is_max else (1,) * n
        rules = [ConvAxis(k[i], s[i], p[i], p[i], d[i], self.ceil_mode) for i in range(n)]
        layout = self._layout(x, rules, [False] * n)
        window = self._halo(x, layout.plan, -math.inf if is_max else 0.0)
        if is_max:
            return _POOL_MAX[n](window, k, s, 0, d)
        out = _POOL_AVG[n](window, k, s, 0, divisor_override=self.divisor_override)
        if self.divisor_override:
            return out
        sizes = [b[-1] for b in layout.in_bounds]
        counted = [
            (-p[i], sizes[i] + p[i]) if self.count_include_pad else (0, sizes[i]) for i in range(n)
        ]
        win = layout.plan.window
        if all(c0 <= lo and hi <= c1 for (lo, hi), (c0, c1) in zip(win, counted)):
            return out
        # Windows reaching past the counted region divide by fewer cells: the share of
        # counted cells in each window is the average pool of a 0/1 mask.
        mask = x.new_zeros((1, 1, *(hi - lo for lo, hi in win)))
        mask[
            (
                0,
                0,
                *(
                    slice(max(c0 - lo, 0), max(min(c1, hi) - lo, 0))
                    for (lo, hi), (c0, c1) in zip(win, counted)
                ),
            )
        ] = 1
        return out / _POOL_AVG[n](mask, k, s, 0)


_POOL_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_POOL_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class PartitionedGlobalPool(Partitioned):
    """``nn.AdaptiveAvgPoolNd(1)`` / ``nn.AdaptiveMaxPoolNd(1)``: one value per channel of the
    whole image, replicated on every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from haloseg.parallel.reduce import global_max, global_sum

        dec = self._hs.dec
        spatial = tuple(range(2, x.dim()))
        if isinstance(self, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return global_max(x, dec)
        bounds = self._layout(x, [ConvAxis(1)] * (x.dim() - 2)).in_bounds
        total = math.prod(b[-1] for b in bounds)
        return global_sum(x.sum(spatial, keepdim=True), dec, replicated=False) / total


# ---------------------------------------------------------------------------- interpolation


@dataclass(frozen=True, eq=False)
class _InterpAxis(IndexAxis):
    weight: torch.Tensor | None = None
    """Linear modes: the weight of the last source index, per output."""


class PartitionedUpsample(Partitioned):
    """``nn.Upsample``: nearest, nearest-exact and (bi/tri)linear, align_corners True or
    False, by size or scale factor, with PyTorch's own source indices and weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2

        def rules(sizes: list[int]) -> list[AxisRule]:
            return [self._table(sizes[i], i, n) for i in range(n)]

        layout = self._layout(x, rules)
        out = self._halo(x, layout.plan, 0.0)
        for i, ((a, b), table) in enumerate(zip(layout.out_box, layout.rules, strict=True)):
            lo0 = layout.plan.window[i][0]
            i0 = torch.tensor(table.lo[a:b], dtype=torch.long, device=x.device) - lo0
            picked = out.index_select(2 + i, i0)
            if table.weight is not None:
                i1 = torch.tensor(table.hi[a:b], dtype=torch.long, device=x.device) - 1 - lo0
                lam = table.weight[a:b].to(x).view(-1, *([1] * (n - 1 - i)))
                picked = picked * (1 - lam) + out.index_select(2 + i, i1) * lam
            out = picked
        return out

    def _table(self, size: int, axis: int, n: int) -> _InterpAxis:
        """Per output: first source index, last source index + 1, weight of the last."""
        src = torch.arange(size, dtype=torch.float64).view(1, 1, size)
        linear = self.mode in ("linear", "bilinear", "trilinear")
        kwargs: dict[str, Any] = {"mode": "linear" if linear else self.mode}
        if self.size is not None:
            kwargs["size"] = _tuple(self.size, n)[axis]
        else:
            kwargs["scale_factor"] = _tuple(self.scale_factor, n)[axis]
            kwargs["recompute_scale_factor"] = self.recompute_scale_factor
        if linear:
            kwargs["align_corners"] = self.align_corners
        pos = F.interpolate(src, **kwargs).view(-1)
        if not linear:
            idx = pos.round().long().tolist()
            return _InterpAxis(tuple(idx), tuple(i + 1 for i in idx), None)
        first = pos.floor().clamp(max=size - 1)
        lam = pos - first
        last = (first + (lam > 0).double()).long()
        return _InterpAxis(tuple(first.long().tolist()), tuple((last + 1).tolist()), lam)


# ---------------------------------------------------------------------------- normalisation


class _PartitionedNorm(Partitioned):
    def _normalize(
        self,
        x: torch.Tensor,
        view: tuple[int, ...],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Normalise the rows of ``x.view(view)`` with whole-image statistics."""
        dec = self._hs.dec
        if self._hs.stats is not None and isinstance(self, nn.modules.batchnorm._BatchNorm):
            dec = self._hs.stats
        mean, var, count = global_moments(x.reshape(view), dec)
        per_channel = isinstance(self, nn.GroupNorm)
        y = GlobalNormalize.apply(
            x, weight, bias, mean, var, self.eps, view, count, dec, per_channel
        )
        return y, mean, var, count

    def _affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.weight, self.bias) if self.affine else (None, None)

    def _update(self, mean: torch.Tensor, var: torch.Tensor, count: int, factor: float) -> None:
        unbiased = var * (count / max(count - 1, 1))
        with torch.no_grad():
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * unbiased)


class PartitionedBatchNorm(_PartitionedNorm):
    """``nn.BatchNormNd`` with statistics over the batch and the whole image; running
    statistics updated as PyTorch does (unbiased variance, momentum=None = cumulative)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        view = (x.shape[0], x.shape[1], -1)
        y, mean, var, count = self._normalize(x, view, *self._affine())
        if self.training and self.track_running_stats:
            self._update(mean, var, count, factor)
        return y


class PartitionedInstanceNorm(_PartitionedNorm):
    """``nn.InstanceNormNd`` with per-sample statistics over the whole image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats):
            return super().forward(x)
        n, c = x.shape[:2]
        weight, bias = self._affine()
        if weight is not None:
            weight, bias = weight.repeat(n), bias.repeat(n)
        y, mean, var, count = self._normalize(x, (1, n * c, -1), weight, bias)
        if self.training and self.track_running_stats:
            factor = self.momentum if self.momentum is not None else 0.0
            self._update(mean.view(n, c).mean(0), var.view(n, c).mean(0), count, factor)
        return y


class PartitionedGroupNorm(_PartitionedNorm):
    """``nn.GroupNorm`` with per-sample, per-group statistics over the whole image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, x.shape[0] * self.num_groups, -1)
        return self._normalize(x, view, *self._affine())[0]


# ------------------------------------------------------------------------------------ crop


class PartitionedCrop(Partitioned):
    """``haloseg.models.Crop``: drop margins at the image border (a slice or a halo)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        rules = [ConvAxis(1, 1, -m, -m) for m in _tuple(self.margins, n)]
        layout = self._layout(x, rules, [False] * n)
        return self._halo(x, layout.plan, 0.0)
