"""``RunConfig``: one training run, its sections, and the checks that span sections (a
network from another library against the data and the memory savers); the demo's run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haloseg.config.checks import check_choice
from haloseg.config.model import ModelConfig
from haloseg.config.sections import (
    SYNTHETIC_CLASSES,
    DataConfig,
    MemoryConfig,
    ParallelConfig,
    TrainConfig,
)
from haloseg.errors import ConfigError

__all__ = ["GRID", "RunConfig", "demo_config", "timing_config"]


@dataclass(kw_only=True)
class RunConfig:
    """One training run."""

    name: str = "run"
    """Run name (used for the default output folder)."""
    output_dir: str | None = None
    """Run folder for config, checkpoints, metrics and logs (runs/NAME if unset)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        if self.model.target is not None:
            self.model.check_data(**_known_data(self.data))
            _check_memory_savers(self.model.target, self.memory)
        _check_pipeline(self.parallel, self.train.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known_data(data: DataConfig) -> dict[str, int | None]:
    """What the config alone says of the images (all of it for synthetic data; datasets on
    disk say the rest when they are opened)."""
    synthetic = data.kind == "synthetic"
    classes = data.num_classes or (SYNTHETIC_CLASSES if synthetic else None)
    return {"spatial_dims": len(data.shape) if synthetic else None,
            "in_channels": data.in_channels if synthetic else None,
            "num_classes": classes}  # fmt: skip


def _check_memory_savers(target: str, memory: MemoryConfig) -> None:
    """Level checkpointing and the ``skips`` swap policy know haloseg's U-Net only."""
    if memory.checkpoint:
        raise ConfigError(
            f"memory.checkpoint=true recomputes the levels of haloseg's U-Net, which "
            f"model.target={target} does not have; drop memory.checkpoint or use a model.preset"
        )
    if memory.swap == "skips":
        raise ConfigError(
            f"memory.swap=skips knows the skip connections of haloseg's U-Net only, not of "
            f"model.target={target}; use memory.swap=all, min_bytes or budget"
        )


def _check_pipeline(parallel: ParallelConfig, batch_size: int) -> None:
    """Micro-batches split each replica's batch evenly."""
    m = parallel.microbatches
    if m is not None and batch_size % m:
        raise ConfigError(
            f"parallel.microbatches={m} does not divide train.batch_size={batch_size}; "
            f"choose a divisor of {batch_size} or set train.batch_size to a multiple of {m}"
        )


GRID = (2, 2)
"""The demo's process grid."""


def demo_config(folder: str, *, steps: int = 200, size: int = 256) -> RunConfig:
    """The demo's run (``haloseg demo``, ``haloseg bench train``): 3-class ellipses at
    ``size``², the small U-Net, each image over a 2x2 grid of processes."""
    return RunConfig(
        name="demo",
        output_dir=folder,
        device="cpu",
        data=DataConfig(kind="synthetic", shape=[size, size], num_images=48, num_classes=3),
        parallel=ParallelConfig(grid=list(GRID)),
        train=TrainConfig(steps=steps, batch_size=2, val_every=50, checkpoint_every=100),
    )


def timing_config(cfg: RunConfig, grid: list[int], **train: Any) -> RunConfig:
    """``cfg`` on another ``grid``, validating and checkpointing only at its end: a run
    measured for its cost (``train`` replaces training settings, e.g. ``steps``)."""
    return dataclasses.replace(
        cfg, parallel=ParallelConfig(grid=list(grid)),
        train=dataclasses.replace(cfg.train, val_every=10**6, checkpoint_every=10**6, **train),
    )  # fmt: skip
