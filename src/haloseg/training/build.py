"""``build_trainer``: a run's processes, data, model, optimizer and learning-rate schedule,
checked before its folder is touched, and restored from its last checkpoint when resuming."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from haloseg.config import RunConfig, save_config
from haloseg.data.base import Dataset
from haloseg.errors import ConfigError
from haloseg.memory.savers import step_context
from haloseg.training.setup import (
    agree,
    build_datasets,
    build_model,
    init_layout,
    memory_format,
    prepare_run_folder,
)
from haloseg.training.spec import describe_run, write_spec
from haloseg.training.trainer import Trainer

__all__ = ["build_trainer"]

log = logging.getLogger(__name__)


def _schedule(cfg: RunConfig) -> Any:
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_trainer(cfg: RunConfig, *, resume: bool = False) -> Trainer:
    """Processes, data, model, optimizer and run folder of ``cfg`` (restored if resuming)."""
    train_set, val_set = build_datasets(cfg.data)
    _adopt_dataset_labels(cfg, train_set)
    layout = init_layout(cfg, train_set.spatial_dims)
    folder = Path(cfg.output_dir)
    dtype = getattr(torch, cfg.train.dtype)
    fmt = memory_format(cfg.train.memory_format, layout.device, cfg.train.amp,
                        train_set.spatial_dims)  # fmt: skip
    model, weights = build_model(cfg, train_set, layout, dtype, fmt)
    optimizer = torch.optim.AdamW(
        weights.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    trainer = Trainer(cfg, layout, train_set, val_set, model, weights, optimizer, scheduler,
                      folder, dtype, swapper=step_context(cfg.memory, weights),
                      spec=describe_run(cfg, train_set), memory_format=fmt)  # fmt: skip
    if layout.pipeline is not None:
        from haloseg.pipeline.train import PipelineTraining

        trainer.pipeline = PipelineTraining(trainer)
    # Every check before the run folder is touched: a refused run leaves nothing behind.
    # Image sizes against the grid now, not in the middle of the run.
    for dataset in (train_set, val_set):
        shapes = {trainer.padded(dataset.info(i).shape) for i in range(len(dataset))}
        for shape in shapes:
            layout.dec.image_bounds(shape)
        if dataset is train_set and len(shapes) > 1 and cfg.train.batch_size > 1:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} but the images come in shapes "
                f"{sorted(shapes)[:3]}...; use train.batch_size=1 (and train.accumulate) for "
                "datasets of differently sized images"
            )
    if resume and trainer.restore():
        log.info("resuming at step %d", trainer.step)
    agree(lambda: prepare_run_folder(cfg.output_dir, resume=resume))
    if layout.is_main:
        save_config(cfg, folder / "config.yaml")
        write_spec(trainer.spec, folder)
    return trainer


def _adopt_dataset_labels(cfg: RunConfig, dataset: Dataset) -> None:
    """Regions and ignore label a dataset declares (nnU-Net's dataset.json), where the
    config sets none, so the run's config.yaml and spec say what training used."""
    data = cfg.data
    if not data.regions and getattr(dataset, "regions", None):
        data.regions = {k: list(v) for k, v in dataset.regions.items()}
    if data.ignore_label is None and getattr(dataset, "ignore_label", None) is not None:
        data.ignore_label = int(dataset.ignore_label)
