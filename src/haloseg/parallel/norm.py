"""Normalisation with statistics over the whole image: moments and the normalising Function.

Statistics are combined across ranks from per-rank counts, means and centred sums of squares
(Chan et al.), one all-gather per layer, so fp32 keeps the accuracy of a two-pass variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from haloseg.parallel.comm import timed
from haloseg.parallel.decomposition import Decomposition

__all__ = ["GlobalNormalize", "global_moments"]


def global_moments(
    xv: torch.Tensor, stat_dims: Sequence[int], dec: Decomposition
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance over ``stat_dims`` of the whole distributed tensor, and count."""
    n_local = math.prod(xv.shape[d] for d in stat_dims)
    keep = [1 if d in stat_dims else s for d, s in enumerate(xv.shape)]
    if n_local:
        var, mean = torch.var_mean(xv.detach(), dim=tuple(stat_dims), unbiased=False, keepdim=True)
    else:
        mean = var = xv.new_zeros(keep)
    if dec.size == 1:
        return mean, var, n_local
    local = torch.stack([mean.new_full(keep, float(n_local)), mean, var * n_local])
    parts = [torch.empty_like(local) for _ in range(dec.size)]
    with timed("norm"):
        dist.all_gather(parts, local, group=dec.group)
    counts, means, m2s = torch.stack(parts).unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, int(total.flatten()[0].item())


class GlobalNormalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with global ``mean``/``invstd``.

    ``view`` reshapes ``x (N, C, *spatial)`` so that ``stat_dims`` are the reduced dims (for
    GroupNorm: ``(N, G, C // G, *spatial)``). Backward needs two more global sums per
    statistic, one all-reduce. Only ``x`` is saved, as plain PyTorch does.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        view: tuple[int, ...],
        stat_dims: tuple[int, ...],
        count: int,
        dec: Decomposition,
    ) -> torch.Tensor:
        y = ((x.view(view) - mean) * invstd).view(x.shape)
        if weight is not None:
            y = y * _channel(weight, x) + _channel(bias, x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.view, ctx.stat_dims, ctx.count, ctx.dec = view, stat_dims, count, dec
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        xhat = (x.view(ctx.view) - mean) * invstd
        gw = gb = gx = None
        channel_dims = (0, *range(2, x.dim()))
        if weight is not None and ctx.needs_input_grad[1]:
            gw = (g * xhat.view(x.shape)).sum(channel_dims)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(channel_dims)
        if ctx.needs_input_grad[0]:
            gy = (g * _channel(weight, x) if weight is not None else g).view(ctx.view)
            sums = torch.stack(
                [gy.sum(ctx.stat_dims, keepdim=True), (gy * xhat).sum(ctx.stat_dims, keepdim=True)]
            )
            if ctx.dec.size > 1:
                with timed("norm"):
                    dist.all_reduce(sums, group=ctx.dec.group)
            sums = sums / ctx.count
            gx = (invstd * (gy - sums[0] - xhat * sums[1])).view(x.shape)
        return gx, gw, gb, None, None, None, None, None, None


def _channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.view(1, -1, *([1] * (x.dim() - 2)))
