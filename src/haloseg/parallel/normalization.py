"""Partitioned normalisation layers: BatchNorm, InstanceNorm and GroupNorm with statistics
over the whole image (``haloseg.parallel.norm``), running statistics as PyTorch keeps them."""

from __future__ import annotations

import torch
from torch import nn

from haloseg.parallel.norm import GlobalNormalize, global_moments
from haloseg.parallel.partitioned import Partitioned

__all__ = ["PartitionedBatchNorm", "PartitionedGroupNorm", "PartitionedInstanceNorm"]


class _PartitionedNorm(Partitioned):
    def _normalize(
        self,
        x: torch.Tensor,
        view: tuple[int, ...] | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        group: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Normalise the rows of ``x.view(view)`` with whole-image statistics; with
        ``view=None``, runs of ``group`` channels of ``x`` itself (no copy of a channels-last
        block)."""
        dec = self._hs.dec
        if self._hs.stats is not None and isinstance(self, nn.modules.batchnorm._BatchNorm):
            dec = self._hs.stats
        rows = x if view is None else x.reshape(view)
        mean, var, count = global_moments(rows, dec, group)
        per_channel = isinstance(self, nn.GroupNorm)
        y = GlobalNormalize.apply(
            x, weight, bias, mean, var, self.eps, view, count, dec, per_channel, group
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
        y, mean, var, count = self._normalize(x, None, *self._affine())
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
        # One sample's rows are its channels: no view needed.
        view = None if n == 1 else (1, n * c, -1)
        y, mean, var, count = self._normalize(x, view, weight, bias)
        if self.training and self.track_running_stats:
            factor = self.momentum if self.momentum is not None else 0.0
            self._update(mean.view(n, c).mean(0), var.view(n, c).mean(0), count, factor)
        return y


class PartitionedGroupNorm(_PartitionedNorm):
    """``nn.GroupNorm`` with per-sample, per-group statistics over the whole image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # one sample: its rows are runs of channels
            group = x.shape[1] // self.num_groups
            return self._normalize(x, None, *self._affine(), group)[0]
        view = (1, x.shape[0] * self.num_groups, -1)
        return self._normalize(x, view, *self._affine())[0]
