"""Run configuration: nested dataclasses validated on construction (``sections``, ``model``,
``run``), loaded from YAML plus ``key=value`` overrides and saved next to every run's outputs
(``loading``)."""

from __future__ import annotations

from haloseg.config.checks import check_ignore_label
from haloseg.config.loading import load_config, save_config
from haloseg.config.model import ModelConfig
from haloseg.config.run import GRID, RunConfig, demo_config, timing_config
from haloseg.config.sections import (
    DATA_KINDS,
    SWAP_POLICIES,
    SYNTHETIC_CLASSES,
    DataConfig,
    MemoryConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "DATA_KINDS",
    "GRID",
    "SWAP_POLICIES",
    "SYNTHETIC_CLASSES",
    "DataConfig",
    "MemoryConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "check_ignore_label",
    "demo_config",
    "load_config",
    "save_config",
    "timing_config",
]
