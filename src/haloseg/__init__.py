"""haloseg: exact spatial-parallel U-Net segmentation of images too large for one device."""

from haloseg.errors import (
    ConfigError,
    DataError,
    DecompositionError,
    HalosegError,
    UnsupportedLayerError,
)
from haloseg.models import UNet, unet_preset
from haloseg.parallel import (
    Decomposition,
    accuracy,
    cross_entropy,
    global_sum,
    soft_dice_loss,
    spatial_parallel,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Decomposition",
    "DecompositionError",
    "HalosegError",
    "UNet",
    "UnsupportedLayerError",
    "accuracy",
    "cross_entropy",
    "global_sum",
    "soft_dice_loss",
    "spatial_parallel",
    "unet_preset",
]
