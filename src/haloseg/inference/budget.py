"""Tile size from a memory budget, by measuring the model's live bytes per voxel.

One forward pass on a small probe tile runs under a dispatch mode that adds up the bytes of
every tensor the network allocates and subtracts them when they are freed; the peak over
the pass, divided by the probe's voxels, is what each voxel of a tile costs. Activation
memory of a convolutional network grows linearly with the tile's voxels, so the largest
tile within the budget follows.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from haloseg.errors import ConfigError
from haloseg.inference.receptive import ReceptiveField
from haloseg.memory.tracker import LiveBytes
from haloseg.units import format_bytes

__all__ = ["bytes_per_voxel", "tile_for_budget"]

log = logging.getLogger(__name__)


def bytes_per_voxel(model: nn.Module, spatial_dims: int, in_channels: int, side: int) -> float:
    """Peak bytes the forward pass allocates per input voxel, measured on a ``side``^d tile."""
    param = next(model.parameters())
    x = torch.zeros((1, in_channels, *([side] * spatial_dims)), dtype=param.dtype)
    counter = LiveBytes()
    with torch.no_grad(), counter:
        model(x.to(param.device))
    return counter.peak / side**spatial_dims


def tile_for_budget(
    model: nn.Module,
    rf: ReceptiveField,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    budget: int,
    *,
    batch_size: int = 1,
    read_ahead: int = 2,
) -> tuple[int, ...]:
    """The largest aligned cubic core whose tile (core + 2 halo) fits ``budget`` bytes of
    activations, input and output buffers, with ``read_ahead`` batches queued."""
    a = rf.alignment
    probe = max(a, min(4 * a, 128))
    per_voxel = bytes_per_voxel(model, spatial_dims, in_channels, probe) * batch_size
    # Tile buffers: queued inputs (float32), the logits copied to host, the merged core.
    per_voxel += 4 * in_channels * batch_size * (read_ahead + 1) + 8 * out_channels * batch_size
    # A quarter held back for what the count cannot see: allocator slack, the reader's and
    # decoders' copies, arg-max temporaries (measured: 0.85 of the budget overshot by 3.5%).
    voxels = 0.75 * max(budget, 0) / per_voxel
    side = int(voxels ** (1 / spatial_dims))
    core = (side - 2 * max(rf.halo)) // a * a
    if core < a:
        need = per_voxel * (a + 2 * max(rf.halo)) ** spatial_dims
        raise ConfigError(
            f"a memory budget of {format_bytes(budget, 'MiB', 0)} fits no tile: the smallest "
            f"tile ({a} + 2 x {max(rf.halo)} halo per side) needs {format_bytes(need, 'MiB', 0)}; "
            "raise --max-memory"
        )
    log.info("tile core %d^%d from %.0f bytes per voxel", core, spatial_dims, per_voxel)
    return (core,) * spatial_dims


def tile_memory(per_voxel: float, core: int, halo: int, spatial_dims: int) -> float:
    """Bytes of one tile of ``core`` + 2 ``halo`` per side at ``per_voxel``."""
    return per_voxel * math.pow(core + 2 * halo, spatial_dims)
