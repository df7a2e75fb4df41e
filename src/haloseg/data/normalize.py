"""Intensity normalisation per image and channel with whole-image statistics.

The arithmetic is split so that statistics can be gathered from pieces of an image (blocks
of a spatial decomposition, chunks of a file larger than memory) and applied to any piece:
``block_moments`` of each piece add up to the moments of the whole image, from which
``zscore_from_moments`` gives one mean and standard deviation per channel. Training and
inference both go through these functions, so a prediction sees the numbers training saw.
"""

from __future__ import annotations

import torch

__all__ = [
    "NORMALIZE",
    "apply_zscore",
    "block_moments",
    "normalization_mask",
    "zscore_from_moments",
]

NORMALIZE = ("zscore", "zscore_nonzero", "none")
"""``zscore``: every voxel of the image; ``zscore_nonzero``: statistics over non-zero voxels
only, zeros stay zero (the background of skull-stripped MRI); ``none``: raw intensities."""


def normalization_mask(image: torch.Tensor, valid: torch.Tensor, scheme: str) -> torch.Tensor:
    """Voxels ``(C, *spatial)`` that count in the statistics and are normalised: the image's
    own (``valid (*spatial)``, not padding), and non-zero for ``zscore_nonzero``."""
    mask = valid.unsqueeze(0).expand_as(image)
    return mask & (image != 0) if scheme == "zscore_nonzero" else mask


def block_moments(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(3, C)`` float64: voxel count, sum and sum of squares per channel over ``mask``."""
    x = image.to(torch.float64) * mask
    dims = tuple(range(1, image.dim()))
    return torch.stack([mask.sum(dims).to(torch.float64), x.sum(dims), (x * x).sum(dims)])


def zscore_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel (population; at least 1e-8) from the summed
    ``block_moments`` of every piece of an image."""
    count, total, squares = moments.unbind(0)
    count = count.clamp(min=1)
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt().clamp(min=1e-8)
    return mean, std


def apply_zscore(
    image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``(image - mean) / std`` per channel inside ``mask``, zero outside, in ``image``'s dtype."""
    view = (-1, *([1] * (image.dim() - 1)))
    out = (image.to(torch.float64) - mean.view(view)) / std.view(view)
    return (out * mask).to(image.dtype)
