"""Distributed execution: decomposition, halo exchange, partitioned layers, conversion."""

from haloseg.parallel.convert import spatial_parallel, supported_layers
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.reduce import accuracy, cross_entropy, global_sum, soft_dice_loss

__all__ = [
    "Decomposition",
    "accuracy",
    "cross_entropy",
    "global_sum",
    "soft_dice_loss",
    "spatial_parallel",
    "supported_layers",
]
