"""The network a run spec's ``model`` entry describes, built without the run's config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from haloseg.models.target import build_target
from haloseg.models.unet import unet_preset

__all__ = ["build_network"]


def build_network(entry: Mapping[str, Any]) -> nn.Module:
    """A haloseg U-Net preset (``{"preset", "spatial_dims", "in_channels", "out_channels",
    **overrides}``) or a network class of another library (``{"target", "kwargs", ...}``,
    ``kwargs`` complete: the data's arguments already filled in)."""
    if entry.get("target") is not None:
        return build_target(entry["target"], entry.get("kwargs") or {})
    args = {k: v for k, v in entry.items() if k not in ("preset", "target", "kwargs")}
    return unet_preset(entry["preset"], **args)
