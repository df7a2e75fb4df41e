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
        if self.parallel.pipeline > 1:
            _check_stages(self.parallel.pipeline, self.model.target, self.memory)
        if self.memory.executor == "layerwise":
            _check_layerwise(self.parallel, self.memory)

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
    stages = parallel.pipeline
    if m is not None and stages == 1:
        raise ConfigError(
            f"parallel.microbatches={m} splits the batches of a pipeline, but "
            "parallel.pipeline=1; set parallel.pipeline to the stages, or drop "
            "parallel.microbatches (train.accumulate adds up the gradients of smaller batches)"
        )
    micro = m if m is not None else batch_size
    if stages > 1 and parallel.schedule == "1f1b" and micro < stages:
        given = (f"parallel.microbatches={m}" if m is not None
                 else f"train.batch_size={batch_size} (one image per micro-batch)")  # fmt: skip
        raise ConfigError(
            f"parallel.schedule=1f1b needs at least as many micro-batches as the "
            f"parallel.pipeline={stages} stages, but {given} gives {micro}; set "
            f"parallel.microbatches (and train.batch_size) to at least {stages} or use "
            "parallel.schedule=gpipe"
        )


def _check_layerwise(parallel: ParallelConfig, memory: MemoryConfig) -> None:
    """Layer-wise execution is one process holding every whole image, block by block."""
    grid = parallel.grid or []
    clashes = [
        (parallel.pipeline > 1, f"parallel.pipeline={parallel.pipeline}"),
        (parallel.mode == "tiles", "parallel.mode=tiles"),
        (parallel.data > 1, f"parallel.data={parallel.data}"),
        (any(g > 1 for g in grid), f"parallel.grid={grid}"),
        (memory.swap != "none", f"memory.swap={memory.swap}"),
        (memory.checkpoint, "memory.checkpoint=true"),
    ]
    for clash, what in clashes:
        if clash:
            raise ConfigError(
                f"memory.executor=layerwise runs the whole image in one process, block by "
                f"block, with every layer's output in host memory; {what} does not combine "
                f"with it: drop {what.split('=')[0]} or memory.executor"
            )


def _check_stages(stages: int, target: str | None, memory: MemoryConfig) -> None:
    """What a pipeline can cut into stages and run within its schedule."""
    if memory.checkpoint:
        raise ConfigError(
            f"memory.checkpoint=true recomputes whole U-Net levels, which parallel.pipeline="
            f"{stages} cuts across stages; drop memory.checkpoint or parallel.pipeline"
        )
    if memory.swap != "none":
        raise ConfigError(
            f"memory.swap={memory.swap} does not run inside a pipeline's schedule, whose "
            f"micro-batches interleave forwards and backwards; drop memory.swap or "
            f"parallel.pipeline={stages}"
        )
    if target is not None:
        from haloseg.models.target import resolve_target
        from haloseg.pipeline.blocks import SkipSequence

        cls = resolve_target(target)
        if not (isinstance(cls, type) and issubclass(cls, SkipSequence)):
            raise ConfigError(
                f"model.target={target} is not a haloseg.pipeline.SkipSequence, so "
                f"parallel.pipeline={stages} cannot cut it into stages; use a model.preset "
                "(haloseg's U-Net) or write the network as a SkipSequence of Blocks"
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
