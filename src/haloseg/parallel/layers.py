"""The partitioned layers: one mixin per registered execution (convolution, transposed
convolution, pooling, global pooling, interpolation, padding, normalisation), each a thin
bridge from the layer's attributes to the partitioned execution of its geometry."""

from __future__ import annotations

import torch
from torch import nn

from haloseg.errors import UnsupportedLayerError
from haloseg.parallel.conv import conv_blocks, conv_transpose_blocks
from haloseg.parallel.normalization import (
    PartitionedBatchNorm,
    PartitionedGroupNorm,
    PartitionedInstanceNorm,
)
from haloseg.parallel.partitioned import Partitioned
from haloseg.parallel.pool import global_pool_blocks, pool_blocks
from haloseg.parallel.resample import interpolate_blocks, pad_blocks

__all__ = ["EXECUTIONS", "Partitioned"]


class PartitionedConv(Partitioned):
    """``nn.ConvNd`` on blocks: any kernel, stride, dilation, groups, padding (incl. 'same')
    and padding_mode (zeros, reflect, replicate, circular)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_blocks(self._hs, x, self.weight, self.bias, self._geometry(x), self.groups)


class PartitionedConvTranspose(Partitioned):
    """``nn.ConvTransposeNd`` on blocks: any kernel, stride, padding, output_padding."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            raise UnsupportedLayerError(
                f"layer '{self._hs.path}': output_size= in a partitioned transposed convolution "
                "is not supported; set output_padding on the layer instead"
            )
        return conv_transpose_blocks(self._hs, x, self.weight, self.bias, self._geometry(x),
                                     self.groups)  # fmt: skip


class PartitionedPool(Partitioned):
    """``nn.MaxPoolNd`` / ``nn.AvgPoolNd``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_max = isinstance(self, nn.modules.pooling._MaxPoolNd)
        return pool_blocks(self._hs, x, self._geometry(x), is_max=is_max,
                           count_include_pad=getattr(self, "count_include_pad", True),
                           divisor_override=getattr(self, "divisor_override", None))  # fmt: skip


class PartitionedGlobalPool(Partitioned):
    """``nn.AdaptiveAvgPoolNd(1)`` / ``nn.AdaptiveMaxPoolNd(1)``: one value per channel of the
    whole image, replicated on every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._geometry(x)  # refuses output sizes other than 1
        is_max = isinstance(self, nn.modules.pooling._AdaptiveMaxPoolNd)
        return global_pool_blocks(self._hs, x, is_max=is_max)


class PartitionedUpsample(Partitioned):
    """``nn.Upsample``: nearest, nearest-exact and (bi/tri)linear, align_corners True or
    False, by (global) size or scale factor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return interpolate_blocks(self._hs, x, self._geometry(x))


class PartitionedPad(Partitioned):
    """The pad modules (constant, zero, reflection, replication, circular) and ``Crop``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_blocks(self._hs, x, self._geometry(x), getattr(self, "padding", ()),
                          getattr(self, "value", None))  # fmt: skip


EXECUTIONS: dict[str, type[Partitioned]] = {
    "conv": PartitionedConv,
    "conv_transpose": PartitionedConvTranspose,
    "pool": PartitionedPool,
    "global_pool": PartitionedGlobalPool,
    "upsample": PartitionedUpsample,
    "pad": PartitionedPad,
    "batch_norm": PartitionedBatchNorm,
    "instance_norm": PartitionedInstanceNorm,
    "group_norm": PartitionedGroupNorm,
}
"""The mixin of each execution a registry entry names."""
