"""Segmentation networks: a plain configurable U-Net and its presets, and networks of other
libraries named by a dotted path (``model.target``)."""

from __future__ import annotations

from haloseg.models.build import build_network
from haloseg.models.target import build_target, resolve_target
from haloseg.models.unet import PRESETS, Crop, UNet, count_layers, unet_preset

__all__ = [
    "PRESETS",
    "Crop",
    "UNet",
    "build_network",
    "build_target",
    "count_layers",
    "resolve_target",
    "unet_preset",
]
