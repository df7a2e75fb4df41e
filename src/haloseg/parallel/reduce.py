"""Global reductions of blocks, and losses and metrics on blocks equal to whole-image values.

Two adjoints exist for a sum over ranks, and which is right depends on who consumes the
result. When every rank computes the *same* thing from it (a loss), each rank's gradient is
already the whole gradient: backward is the identity. When each rank uses it on its own
block (a global pool inside the network), the gradients of the ranks add up: backward is
another sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.parallel.amp import amp_backward, amp_forward
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.tape import taped
from haloseg.parallel.timing import timed

__all__ = ["accuracy", "cross_entropy", "global_max", "global_sum", "soft_dice_loss"]


def _all_reduce(
    t: torch.Tensor, dec: Decomposition, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """``t`` reduced in place over the group (a forward collective: taped when checkpointed)."""
    with timed("reduce", group_wide=True):
        dist.all_reduce(t, op=op, group=dec.group)
    return t


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx: Any, t: torch.Tensor, dec: Decomposition, replicated: bool) -> torch.Tensor:
        ctx.dec, ctx.replicated = dec, replicated
        out = t.clone()
        if dec.size > 1:
            # A copy: the taped sum must outlive in-place changes of the output.
            out = taped("reduce", tuple(t.shape), lambda: _all_reduce(out, dec)).clone()
        return out

    @staticmethod
    @amp_backward
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.replicated or ctx.dec.size == 1:
            return g, None, None
        g = g.clone()
        with timed("reduce", group_wide=True):
            dist.all_reduce(g, group=ctx.dec.group)
        return g, None, None


def global_sum(t: torch.Tensor, dec: Decomposition, *, replicated: bool = True) -> torch.Tensor:
    """Sum of ``t`` over the ranks of ``dec``, differentiable.

    ``replicated=True`` (losses, metrics): every rank goes on to compute the same value.
    ``replicated=False`` (inside a network): each rank uses the sum on its own block.
    """
    return _AllReduceSum.apply(t, dec, replicated)


class _GlobalMax(torch.autograd.Function):
    """Max over the spatial dims of the whole image; the gradient goes to the first maximum
    in row-major order of the whole image, as PyTorch's adaptive max pooling does."""

    @staticmethod
    @amp_forward
    def forward(ctx: Any, x: torch.Tensor, dec: Decomposition) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        local_max, local_arg = flat.max(-1)
        best = local_max.clone()
        if dec.size > 1:
            best = taped("reduce", tuple(best.shape),
                         lambda: _all_reduce(best, dec, dist.ReduceOp.MAX)).clone()  # fmt: skip
        # Ties between ranks: the smallest global row-major index wins.
        bounds = dec.bounds_of(x.shape[2:])
        strides, box = _global_strides(bounds), _rank_box(bounds, dec)
        coords = torch.stack(torch.unravel_index(local_arg, x.shape[2:]), -1)
        origin = torch.tensor([lo for lo, _ in box], device=x.device)
        index = ((coords + origin) * torch.tensor(strides, device=x.device)).sum(-1)
        big = torch.iinfo(torch.int64).max
        index = torch.where(local_max == best, index, torch.full_like(index, big))
        winner = index.clone()
        if dec.size > 1:
            winner = taped("reduce", tuple(winner.shape),
                           lambda: _all_reduce(winner, dec, dist.ReduceOp.MIN))  # fmt: skip
        ctx.mine = index == winner
        ctx.save_for_backward(local_arg)
        ctx.shape, ctx.dec = x.shape, dec
        return best.view(n, c, *([1] * (x.dim() - 2)))

    @staticmethod
    @amp_backward
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (local_arg,) = ctx.saved_tensors
        g = g.reshape(local_arg.shape).clone()
        if ctx.dec.size > 1:
            with timed("reduce", group_wide=True):
                dist.all_reduce(g, group=ctx.dec.group)
        n, c = ctx.shape[:2]
        grad = g.new_zeros(n, c, int(torch.tensor(ctx.shape[2:]).prod()))
        grad.scatter_(-1, local_arg.unsqueeze(-1), (g * ctx.mine).unsqueeze(-1))
        return grad.view(ctx.shape), None


def _global_strides(bounds: list[list[int]]) -> list[int]:
    strides, acc = [], 1
    for b in reversed(bounds):
        strides.append(acc)
        acc *= b[-1]
    return list(reversed(strides))


def _rank_box(bounds: list[list[int]], dec: Decomposition) -> list[tuple[int, int]]:
    return [(b[c], b[c + 1]) for b, c in zip(bounds, dec.coords, strict=True)]


def global_max(x: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    """``(N, C, *block) -> (N, C, 1, ...)``: max over the whole image, on every rank."""
    return _GlobalMax.apply(x, dec)


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    dec: Decomposition,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over every pixel of the whole batch of images.

    ``logits (N, C, *block)``, ``target (N, *block)`` class indices; pixels where the
    boolean ``valid (N, *block)`` is false (padding) count for nothing.
    """
    if valid is not None:
        target = target.masked_fill(~valid, -100)  # F.cross_entropy's ignore_index
    total = F.cross_entropy(logits, target, reduction="sum")
    count = target.numel() if valid is None else valid.sum()
    # Sums in fp64: a bf16 count of 10,000 voxels would round to 9,984.
    count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    both = global_sum(torch.stack([total.double(), count]), dec)
    return (both[0] / both[1].detach()).to(total.dtype)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dec: Decomposition,
    *,
    smooth: float = 1e-5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - mean over (sample, class) of 2|P∩T| / (|P| + |T|)`` with softmax probabilities,
    the sums taken over the whole image (as MONAI's ``DiceLoss(softmax=True,
    to_onehot_y=True)``), leaving out pixels where ``valid`` is false."""
    probs = logits.softmax(1)
    if valid is not None:
        target = target.masked_fill(~valid, 0)
        probs = probs * valid.unsqueeze(1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs)
    if valid is not None:
        onehot = onehot * valid.unsqueeze(1)
    dims = _spatial(logits)
    sums = torch.stack([(probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)])
    inter, p, t = global_sum(sums, dec).unbind(0)
    return 1 - ((2 * inter + smooth) / (p + t + smooth)).mean()


def accuracy(logits: torch.Tensor, target: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    """Share of pixels of the whole image whose arg-max class equals ``target``."""
    hits = (logits.argmax(1) == target).sum().to(torch.float64)
    both = global_sum(torch.stack([hits, hits.new_tensor(float(target.numel()))]), dec)
    return both[0] / both[1]
