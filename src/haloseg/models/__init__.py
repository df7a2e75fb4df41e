"""Segmentation networks: a plain configurable U-Net and its presets."""

from __future__ import annotations

from haloseg.models.unet import PRESETS, Crop, UNet, count_layers, unet_preset

__all__ = ["PRESETS", "Crop", "UNet", "count_layers", "unet_preset"]
