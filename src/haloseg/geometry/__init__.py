"""Pure geometry of spatial decomposition: blocks, per-layer windows, halo plans."""

from haloseg.geometry.bands import boundary_bands
from haloseg.geometry.blocks import (
    Box,
    Range,
    block_boxes,
    box_volume,
    boxes_from_bounds,
    grid_coords,
    grid_rank,
    intersect,
    nearest_multiples,
    split_extent,
    to_local,
)
from haloseg.geometry.halo import HaloPlan, Piece, plan_exchange, trim_padding
from haloseg.geometry.rules import (
    AxisRule,
    ConvAxis,
    IndexAxis,
    TransposedConvAxis,
    out_bounds,
    same_padding,
)

__all__ = [
    "AxisRule",
    "Box",
    "ConvAxis",
    "HaloPlan",
    "IndexAxis",
    "Piece",
    "Range",
    "TransposedConvAxis",
    "block_boxes",
    "boundary_bands",
    "box_volume",
    "boxes_from_bounds",
    "grid_coords",
    "grid_rank",
    "intersect",
    "nearest_multiples",
    "out_bounds",
    "plan_exchange",
    "same_padding",
    "split_extent",
    "to_local",
    "trim_padding",
]
