"""Normalisation with statistics over the whole image: moments and the normalising Function.

One statistic per row. The rows are the channels of the block itself (BatchNorm; InstanceNorm
of one sample), or runs of ``group`` consecutive channels (GroupNorm of one sample): PyTorch's
fused batch-norm kernels take the block as it is, channels-last included, with statistics per
channel expanded from the groups. Otherwise the block is viewed as ``(1, R, L)``
(InstanceNorm: ``R = N*C``; GroupNorm: ``R = N*G``), which copies a channels-last block.
Per-rank counts, means and centred sums of squares are combined across ranks (Chan et al.) in
one all-gather, so fp32 keeps the accuracy of a two-pass variance; the backward needs one
all-reduce of two sums per statistic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from haloseg.parallel.amp import amp_backward, amp_forward
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.halo import memory_format_of
from haloseg.parallel.tape import taped
from haloseg.parallel.timing import timed
from haloseg.parallel.transport import gather_small, sum_small

__all__ = ["GlobalNormalize", "global_moments"]


def global_moments(
    xv: torch.Tensor, dec: Decomposition, group: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance per row of ``xv (B, R, *L)`` (rows on dim 1, reduced over
    every other dim; with ``group`` > 1, per run of ``group`` rows) over the whole
    distributed tensor, and the number of elements each statistic covers."""
    rows = xv.shape[1]
    n_local = xv.numel() // rows if rows else 0
    if n_local:
        mean, var = torch.batch_norm_update_stats(xv.detach(), None, None, 0.0)
    else:
        mean = var = xv.new_zeros(rows)
    if group > 1:
        mean, var, n_local = _merge_rows(mean, var, n_local, group)
        rows //= group
    if dec.size == 1:
        return mean, var, n_local
    local = torch.stack([mean.new_full((rows,), float(n_local)), mean, var * n_local])
    parts = taped("norm", (rows, n_local), lambda: _gather(local, dec))
    counts, means, m2s = torch.stack(parts).unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, int(total[0].item()) if rows else 0


def _merge_rows(
    mean: torch.Tensor, var: torch.Tensor, count: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Moments of runs of ``group`` rows of ``count`` elements each (Chan et al.)."""
    means = mean.view(-1, group)
    merged = means.mean(1)
    m2 = var.view(-1, group).sum(1) + ((means - merged[:, None]) ** 2).sum(1)
    return merged, m2 / group, count * group


def _gather(local: torch.Tensor, dec: Decomposition) -> list[torch.Tensor]:
    with timed("norm", group_wide=True):
        return gather_small(local, dec.rank, dec.peers, dec.group)


class GlobalNormalize(torch.autograd.Function):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` per row of ``x.view(view)``, with
    global ``mean``/``var``; with ``view=None`` per row of runs of ``group`` channels of ``x``
    itself, in ``x``'s memory format. Only ``x`` is saved, as plain PyTorch does; forward and
    backward run PyTorch's fused batch-norm kernels and add the global correction terms."""

    @staticmethod
    @amp_forward
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        view: tuple[int, ...] | None,
        count: int,
        dec: Decomposition,
        per_channel: bool = False,
        group: int = 1,
    ) -> torch.Tensor:
        ctx.eps, ctx.view, ctx.count, ctx.dec, ctx.group = eps, view, count, dec, group
        ctx.has_bias, ctx.per_channel = bias is not None, per_channel
        if view is None:
            y = F.batch_norm(x, *_expand(group, mean, var), weight, bias, False, 0.0, eps)
            ctx.save_for_backward(x, weight, mean, var)
            return y
        if per_channel:  # GroupNorm: rows are groups, the affine is per channel
            y = F.batch_norm(x.reshape(view), mean, var, None, None, False, 0.0, eps)
            y = y.view(x.shape)
            if weight is not None:
                y.mul_(_channels(weight, x)).add_(_channels(bias, x))
        else:
            y = F.batch_norm(x.reshape(view), mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var)
        # detach: an output that is a view of an intermediate may not be modified in place
        # (inplace ReLU follows), a detached alias of the same storage may. A copy gives a
        # channels-last block its layout back.
        return y.view(x.shape).contiguous(memory_format=memory_format_of(x)).detach()

    @staticmethod
    @amp_backward
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.view is None:
            return _backward_channels(ctx, g)
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
        g_xhat, g_sum = _local_sums(gv, xv, w, mean, var, ctx.eps)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(gv, xv, w, mean, var, w * g_sum, w * g_xhat, ctx, 1)
            gx = gx.view(x.shape).contiguous(memory_format=memory_format_of(x))
        gw = g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        gb = g_sum if weight is not None and ctx.has_bias and ctx.needs_input_grad[2] else None
        if channel_grads is not None:
            gw, gb = channel_grads
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _expand(group: int, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Per-row values as per-channel ones (each row covers ``group`` channels)."""
    return [r if group == 1 else r.repeat_interleave(group) for r in rows]


def _backward_channels(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``GlobalNormalize``'s backward on ``x`` itself (``view=None``), in its memory format."""
    x, weight, mean, var = ctx.saved_tensors
    mean_c, var_c = _expand(ctx.group, mean, var)
    w = weight if weight is not None else mean_c.new_ones(mean_c.shape)
    g_xhat, g_sum = _local_sums(g, x, w, mean_c, var_c, ctx.eps)
    gx = None
    if ctx.needs_input_grad[0]:
        # Per row, the sums of g' = g * w and of g' * xhat (a row's channels' weights differ).
        s1, s2 = torch.stack([w * g_sum, w * g_xhat]).view(2, -1, ctx.group).sum(2)
        gx = _input_grad(g, x, w, mean, var, s1, s2, ctx, ctx.group)
    affine = weight is not None
    gw = g_xhat if affine and ctx.needs_input_grad[1] else None
    gb = g_sum if affine and ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb, None, None, None, None, None, None, None, None


def _local_sums(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This rank's sums of ``g * xhat`` and of ``g`` per channel (dim 1), in one pass."""
    _, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
        g, x, w, mean, var, None, None, False, eps, [False, True, True]
    )
    return g_xhat, g_sum


def _input_grad(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    s1: torch.Tensor, s2: torch.Tensor, ctx: Any, group: int,
) -> torch.Tensor:  # fmt: skip
    """The input gradient of training-form normalisation per row (``mean``, ``var``) with a
    per-channel (dim 1) ``w``: ``w * invstd * g - invstd * (mean(g') + xhat * mean(g' *
    xhat))`` for ``g' = w * g``, from this rank's per-row sums ``s1`` of g' and ``s2`` of
    g' * xhat, summed over the ranks here. Rows of ``group`` channels."""
    sums = torch.stack([s1, s2])
    if ctx.dec.size > 1:
        with timed("norm", group_wide=True):
            sums = sum_small(sums, ctx.dec.rank, ctx.dec.peers, ctx.dec.group)
    s1, s2 = sums / ctx.count
    invstd = torch.rsqrt(var + ctx.eps)
    # The correction is a per-row affine function of x, a * x + b: PyTorch's eval-mode batch
    # norm computes it in one pass in x's layout (mean 0, variance 1, eps 0: weight a, bias
    # b), and g * w * invstd is added in place.
    a = -invstd * invstd * s2
    b = -invstd * s1 - a * mean
    a, b, invstd = _expand(group, a, b, invstd)
    gx = F.batch_norm(x, torch.zeros_like(a), torch.ones_like(a), a, b, False, 0.0, 0.0)
    return gx.addcmul_(g, _channels(w * invstd, x))


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
