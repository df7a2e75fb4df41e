"""Normalisation with statistics over the whole image: moments and the normalising Function.

Tensors are viewed as ``(B, R, L)`` with one statistic per row ``R`` (BatchNorm: ``(N, C, L)``;
InstanceNorm: ``(1, N*C, L)``; GroupNorm: ``(1, N*G, L)``), which is the layout PyTorch's
fused batch-norm kernels take. Per-rank counts, means and centred sums of squares are combined
across ranks (Chan et al.) in one all-gather, so fp32 keeps the accuracy of a two-pass
variance; the backward needs one all-reduce of two sums per statistic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from haloseg.parallel.comm import (
    _amp_backward,
    _amp_forward,
    gather_small,
    sum_small,
    taped,
    timed,
)
from haloseg.parallel.decomposition import Decomposition

__all__ = ["GlobalNormalize", "global_moments"]


def global_moments(xv: torch.Tensor, dec: Decomposition) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance per row of ``xv (B, R, L)`` over the whole distributed
    tensor, and the number of elements each statistic covers."""
    rows = xv.shape[1]
    n_local = xv.numel() // rows if rows else 0
    if n_local:
        mean, var = torch.batch_norm_update_stats(xv.detach(), None, None, 0.0)
    else:
        mean = var = xv.new_zeros(rows)
    if dec.size == 1:
        return mean, var, n_local
    local = torch.stack([mean.new_full((rows,), float(n_local)), mean, var * n_local])
    parts = taped("norm", (rows, n_local), lambda: _gather(local, dec))
    counts, means, m2s = torch.stack(parts).unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, int(total[0].item()) if rows else 0


def _gather(local: torch.Tensor, dec: Decomposition) -> list[torch.Tensor]:
    with timed("norm", group_wide=True):
        return gather_small(local, dec.rank, dec.peers, dec.group)


class GlobalNormalize(torch.autograd.Function):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` per row of ``x.view(view)``, with
    global ``mean``/``var``. Only ``x`` is saved, as plain PyTorch does; forward and backward
    run PyTorch's fused batch-norm kernels and add the global correction terms."""

    @staticmethod
    @_amp_forward
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        view: tuple[int, ...],
        count: int,
        dec: Decomposition,
        per_channel: bool = False,
    ) -> torch.Tensor:
        if per_channel:  # GroupNorm: rows are groups, the affine is per channel
            y = F.batch_norm(x.reshape(view), mean, var, None, None, False, 0.0, eps)
            y = y.view(x.shape)
            if weight is not None:
                y.mul_(_channels(weight, x)).add_(_channels(bias, x))
        else:
            y = F.batch_norm(x.reshape(view), mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.view, ctx.count, ctx.dec = eps, view, count, dec
        ctx.has_bias, ctx.per_channel = bias is not None, per_channel
        # detach: an output that is a view of an intermediate may not be modified in place
        # (inplace ReLU follows), a detached alias of the same storage may.
        return y.view(x.shape).detach()

    @staticmethod
    @_amp_backward
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        xv = x.reshape(ctx.view)
        channel_grads = None
        if ctx.per_channel:
            if weight is not None:
                channel_grads = _channel_grads(g, x, xv, mean, var, ctx)
                g = g * _channels(weight, x)
            weight = None
        gv = g.reshape(ctx.view)
        w = weight if weight is not None else mean.new_ones(mean.shape)
        # Eval-form backward: g * w * invstd, and the local sums of g * xhat and of g.
        gi, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
            gv, xv, w, mean, var, None, None, False, ctx.eps, [ctx.needs_input_grad[0], True, True]
        )
        gx = None
        if ctx.needs_input_grad[0]:
            sums = torch.stack([g_sum, g_xhat])
            if ctx.dec.size > 1:
                with timed("norm", group_wide=True):
                    sums = sum_small(sums, ctx.dec.rank, ctx.dec.peers, ctx.dec.group)
            s1, s2 = sums / ctx.count
            invstd = torch.rsqrt(var + ctx.eps)
            # Training-form correction: - w * invstd * (mean(g) + xhat * mean(g * xhat)),
            # with global means, written as a per-row affine function of x.
            a = -w * invstd * invstd * s2
            b = -w * invstd * s1 - a * mean
            shape = (1, -1, *([1] * (xv.dim() - 2)))
            gx = gi.addcmul_(xv, a.view(shape)).add_(b.view(shape)).view(x.shape)
        gw = g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        gb = g_sum if weight is not None and ctx.has_bias and ctx.needs_input_grad[2] else None
        if channel_grads is not None:
            gw, gb = channel_grads
        return gx, gw, gb, None, None, None, None, None, None, None


def _channels(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def _channel_grads(
    g: torch.Tensor, x: torch.Tensor, xv: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, ctx: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Local gradients of a per-channel affine after per-row normalisation (GroupNorm)."""
    xhat = F.batch_norm(xv, mean, var, None, None, False, 0.0, ctx.eps).view(x.shape)
    dims = (0, *range(2, x.dim()))
    return (g * xhat).sum(dims), g.sum(dims)
