"""haloseg: exact spatial-parallel U-Net segmentation of images too large for one device."""

from haloseg.config import RunConfig, load_config
from haloseg.errors import (
    ConfigError,
    DataError,
    DecompositionError,
    HalosegError,
    UnsupportedLayerError,
)
from haloseg.evaluation import evaluate, evaluate_case
from haloseg.geometry import register_layer
from haloseg.inference import ReceptiveField, predict_tiled, receptive_field
from haloseg.layerwise import run_layerwise
from haloseg.memory import ActivationSwapper, checkpoint_levels, plan, step_memory
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
    "ActivationSwapper",
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
    "checkpoint_levels",
    "cross_entropy",
    "evaluate",
    "evaluate_case",
    "global_sum",
    "load_config",
    "plan",
    "predict_tiled",
    "receptive_field",
    "register_layer",
    "run_layerwise",
    "soft_dice_loss",
    "spatial_parallel",
    "step_memory",
    "train",
    "unet_preset",
]
