"""Geometry of spatial decomposition: blocks, per-layer windows, halo plans, and the registry
of what each layer and functional call means for blocks."""

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
from haloseg.geometry.calls import call_geometry
from haloseg.geometry.halo import HaloPlan, Piece, plan_exchange, trim_padding
from haloseg.geometry.ops import Geometry, Unsupported
from haloseg.geometry.registry import (
    layer_entry,
    layer_geometry,
    register_layer,
    registered_layers,
)
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
    "Geometry",
    "ConvAxis",
    "HaloPlan",
    "IndexAxis",
    "Piece",
    "Range",
    "TransposedConvAxis",
    "Unsupported",
    "block_boxes",
    "call_geometry",
    "boundary_bands",
    "box_volume",
    "boxes_from_bounds",
    "grid_coords",
    "grid_rank",
    "intersect",
    "layer_entry",
    "layer_geometry",
    "nearest_multiples",
    "out_bounds",
    "plan_exchange",
    "register_layer",
    "registered_layers",
    "same_padding",
    "split_extent",
    "to_local",
    "trim_padding",
]
