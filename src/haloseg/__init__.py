"""haloseg: exact spatial-parallel U-Net segmentation of images too large for one device."""

from haloseg.config import RunConfig, load_config
from haloseg.errors import (
    ConfigError,
    DataError,
    DecompositionError,
    HalosegError,
    UnsupportedLayerError,
)
from haloseg.inference import ReceptiveField, predict_tiled, receptive_field
from haloseg.models import UNet, unet_preset
from haloseg.parallel import (
    Decomposition,
    accuracy,
    cross_entropy,
    global_sum,
    soft_dice_loss,
    spatial_parallel,
)
from haloseg.training import train

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Decomposition",
    "DecompositionError",
    "HalosegError",
    "ReceptiveField",
    "RunConfig",
    "UNet",
    "UnsupportedLayerError",
    "accuracy",
    "cross_entropy",
    "global_sum",
    "load_config",
    "predict_tiled",
    "receptive_field",
    "soft_dice_loss",
    "spatial_parallel",
    "train",
    "unet_preset",
]
