"""Normalisation with statistics over the whole image, from blocks.

A first sweep reads every block of the layer's input and merges per-row moments (count,
mean, centred sum of squares, in float64) with Chan's formula; rows are channels for
BatchNorm, (sample, channel) for InstanceNorm, (sample, group) for GroupNorm, as PyTorch
defines them. The second sweep normalises each block with the whole image's moments. Running
statistics are updated exactly as the layer's own forward would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Moments",
    "block_moments",
    "normalise",
    "normalise_block",
    "statistics_gradient",
    "update_running",
]


@dataclass
class Moments:
    """Per row: voxel count, mean, and centred sum of squares (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise combination of two disjoint parts' moments."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Biased variance, the one normalisation divides by."""
        return self.m2 / self.count


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, *spatial) as (rows, voxels) in the layer's own grouping."""
    n, c = x.shape[:2]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return x.transpose(0, 1).reshape(c, -1)
    if isinstance(m, nn.GroupNorm):
        return x.reshape(n * m.num_groups, -1)
    return x.reshape(n * c, -1)


def block_moments(m: nn.Module, x: torch.Tensor) -> Moments:
    # One block's moments in its own dtype (PyTorch's var_mean is a single accurate pass);
    # only the merge over blocks, where the counts grow, needs float64.
    rows = _rows(m, x)
    var, mean = torch.var_mean(rows, dim=1, correction=0)
    n = rows.shape[1]
    return Moments(n, mean.double(), var.double() * n)


def _per_channel(m: nn.Module, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row statistic as a tensor broadcasting over ``x`` (N, C, *spatial)."""
    n, c = x.shape[:2]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        t = t.view(1, c)
    elif isinstance(m, nn.GroupNorm):
        t = t.view(n, m.num_groups).repeat_interleave(c // m.num_groups, dim=1)
    else:
        t = t.view(n, c)
    return t.view(*t.shape, *([1] * (x.dim() - 2)))


def normalise_block(m: nn.Module, x: torch.Tensor, moments: Moments) -> torch.Tensor:
    """``x`` normalised with the whole image's ``moments``, then the layer's affine map."""
    return normalise(m, x, moments.mean, moments.var)


def normalise(m: nn.Module, x: torch.Tensor, mean: torch.Tensor,
              var: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``(x - mean) * scale + bias`` in ``x``'s dtype, as the layer computes it, with
    ``scale`` (1/std times the weight) formed in float64 from the per-row ``mean`` and
    biased ``var``; differentiable in ``x``, ``mean``, ``var`` and the layer's affine map."""
    mu = _per_channel(m, mean, x).to(x.dtype)
    scale = _per_channel(m, (var + m.eps).rsqrt(), x)
    if getattr(m, "weight", None) is None:
        return (x - mu) * scale.to(x.dtype)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    scale = (scale * m.weight.double().view(shape)).to(x.dtype)
    return torch.addcmul(m.bias.to(x.dtype).view(shape), x - mu, scale)


def statistics_gradient(m: nn.Module, x: torch.Tensor, moments: Moments, d_mean: torch.Tensor,
                        d_var: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The part of the input gradient of the block ``x`` that flows through the whole image's
    statistics, given the gradients ``d_mean``, ``d_var`` of the loss with respect to them:
    ``d_mean / n + d_var * 2 (x - mean) / n`` per row of ``n`` voxels."""
    n = moments.count
    mu = _per_channel(m, moments.mean, x)
    a = _per_channel(m, d_mean / n, x)
    b = _per_channel(m, d_var * (2.0 / n), x)
    return (a + b * (x.double() - mu)).to(x.dtype)


def update_running(m: nn.Module, moments: Moments, samples: int) -> None:
    """Running statistics as the layer's training forward updates them (unbiased variance)."""
    if not m.training or getattr(m, "running_mean", None) is None:
        return
    count = moments.count
    mean, var = moments.mean, moments.m2 / max(count - 1, 1)
    momentum = m.momentum
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        # InstanceNorm: averaged over samples, no batch counter, momentum None means 0.
        mean, var = mean.view(samples, -1).mean(0), var.view(samples, -1).mean(0)
        momentum = momentum or 0.0
    elif m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(m.num_batches_tracked)
    with torch.no_grad():
        m.running_mean.mul_(1 - momentum).add_(mean.to(m.running_mean), alpha=momentum)
        m.running_var.mul_(1 - momentum).add_(var.to(m.running_var), alpha=momentum)
