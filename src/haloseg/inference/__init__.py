"""Exact tiled inference: receptive field, splitter -> model -> merger, readers and writers."""

from haloseg.inference.predict import predict_tiled, predict_whole
from haloseg.inference.receptive import ReceptiveField, receptive_field
from haloseg.inference.tiles import Merger, Tile, plan_tiles

__all__ = [
    "Merger",
    "ReceptiveField",
    "Tile",
    "plan_tiles",
    "predict_tiled",
    "predict_whole",
    "receptive_field",
]
