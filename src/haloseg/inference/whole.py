"""Whole-image inference for networks whose statistics span the image (InstanceNorm,
GroupNorm): one forward pass over the whole image, split over the processes of a spatial
grid by the same engine that trains it, or in one process when the grid is a single block,
or in one process layer by layer over blocks (``haloseg.layerwise``).

Each process reads only its own block of the file (padded at the high end to the size the
grid and network can split, as training pads), normalises it with statistics summed over
all blocks (training's arithmetic), runs the partitioned network and writes the part of its
output block that lies inside the image into the shared output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from haloseg.data.normalize import (
    apply_zscore,
    block_moments,
    normalization_mask,
    zscore_from_moments,
)
from haloseg.inference.tiles import Box, Merger, Tile, read_tile
from haloseg.layerwise import run_layerwise
from haloseg.parallel import Decomposition, global_sum, spatial_parallel
from haloseg.training.samples import padded_shape
from haloseg.training.setup import agree

__all__ = [
    "auto_grid",
    "block_chunks",
    "predict_layerwise",
    "predict_whole_image",
    "whole_image_bytes",
]


def _read_block(
    image: Any, box: Sequence[tuple[int, int]], name: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int], ...]]:
    """(block ``(C, *box)`` zero beyond the image, valid mask, the part inside the image)."""
    spatial = image.shape[1:]
    inside = tuple((min(lo, n), min(hi, n)) for (lo, hi), n in zip(box, spatial, strict=True))
    block = read_tile(image, Tile(read=tuple(box), core=inside), name=name)
    valid = np.zeros(block.shape[1:], bool)
    valid[tuple(slice(0, hi - lo) for lo, hi in inside)] = True
    return torch.from_numpy(block), torch.from_numpy(valid), inside


def _normalised_input(
    image: Any, dec: Decomposition, name: str, dtype: torch.dtype, normalize: str
) -> tuple[torch.Tensor, Box, Box]:
    """This rank's block ``(C, *box)`` of the padded image, normalised with statistics over
    all blocks; its box and the part of the box inside the image."""
    padded = padded_shape(image.shape[1:], dec.align, dec.grid)
    box = dec.box(padded)
    # A bad block on one rank (NaN, unreadable) is raised on all before any collective.
    x, valid, inside = agree(lambda: _read_block(image, box, name), dec.group)
    x = x.to(dtype)  # training normalises in the model's dtype (float64 runs included)
    if normalize != "none":
        mask = normalization_mask(x, valid, normalize)
        mean, std = zscore_from_moments(global_sum(block_moments(x, mask), dec))
        x = apply_zscore(x, mean, std, mask)
    return x, tuple(box), inside


def predict_whole_image(
    model: nn.Module,
    image: Any,
    dec: Decomposition,
    *,
    out: Any,
    output: str = "labels",
    normalize: str = "none",
    name: str = "the image",
    device: str | torch.device = "cpu",
) -> None:
    """This rank's block of one forward pass of ``model`` over the whole ``image``
    ``(C, *spatial)``, written into ``out`` (labels ``(*spatial)`` or scores ``(C', *spatial)``).

    ``model`` is converted in place by ``spatial_parallel`` (a single block needs no peers).
    """
    net = spatial_parallel(model.eval(), dec, sync_gradients=False)
    dtype = next(model.parameters()).dtype
    x, box, inside = _normalised_input(image, dec, name, dtype, normalize)
    with torch.no_grad():
        logits = net(x[None].to(device, dtype))[0].float().cpu().numpy()
    if all(hi > lo for lo, hi in inside):
        Merger(out, output).add(Tile(read=box, core=inside), logits)


def predict_layerwise(
    model: nn.Module,
    image: Any,
    align: int,
    block: Sequence[int],
    *,
    out: Any,
    output: str = "labels",
    normalize: str = "none",
    name: str = "the image",
    device: str | torch.device = "cpu",
    store: str | Path = "memory",
) -> None:
    """The whole-image forward pass of ``predict_whole_image`` in one process, computed layer
    by layer over blocks of ``block`` voxels (``haloseg.layerwise``): the device holds one
    block of one layer, the whole activations live in ``store`` (host memory or a folder)."""
    dec = Decomposition((1,) * (len(image.shape) - 1))
    dec.align = align
    dtype = next(model.parameters()).dtype
    x, box, inside = _normalised_input(image, dec, name, dtype, normalize)
    logits = run_layerwise(model.eval(), x[None], block=block, device=device, store=store)
    Merger(out, output).add(Tile(read=box, core=inside), logits[0].float().numpy())


def whole_image_bytes(per_voxel: float, shape: Sequence[int], align: int, channels: int) -> int:
    """Bytes of a one-process whole-image forward: activations at ``per_voxel`` over the
    image padded to ``align``, plus the input block in float32 and float64 copies."""
    voxels = math.prod(-(-n // align) * align for n in shape)
    return int(voxels * (per_voxel + 12 * channels))


def auto_grid(shape: Sequence[int], processes: int) -> tuple[int, ...]:
    """A grid of ``processes`` blocks: each prime factor splits the axis whose blocks are
    longest, so blocks stay close to cubes."""
    grid = [1] * len(shape)
    n, factors, f = processes, [], 2
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    for f in sorted(factors, reverse=True):
        d = max(range(len(shape)), key=lambda i: shape[i] / grid[i])
        grid[d] *= f
    return tuple(grid)


def block_chunks(dec: Decomposition, shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape of a zarr output that no two blocks share: per axis the greatest common
    divisor of the block boundaries inside the image."""
    padded = padded_shape(shape, dec.align, dec.grid)
    bounds = dec.image_bounds(padded)
    return tuple(
        math.gcd(*[b for b in edges[1:-1] if b < n] or [n]) for edges, n in zip(bounds, shape)
    )
