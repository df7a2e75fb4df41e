"""The run config's ``memory:`` section: the swapper of a step, and the memory model's view
of a run."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from haloseg.config import MemoryConfig, RunConfig
from haloseg.memory.model import StepSpec
from haloseg.units import parse_bytes

__all__ = ["run_spec", "step_context"]


def step_context(cfg: MemoryConfig, model: nn.Module) -> contextlib.AbstractContextManager:
    """The context every forward and backward of a training step runs in: the activation
    swapper of ``model``, or nothing."""
    if cfg.swap == "none":
        return contextlib.nullcontext()
    from haloseg.memory.swap import ActivationSwapper

    budget = parse_bytes(cfg.swap_budget) if cfg.swap_budget is not None else None
    return ActivationSwapper(model, policy=cfg.swap, min_bytes=cfg.swap_min_bytes,
                             budget=budget, prefetch=cfg.prefetch)  # fmt: skip


def run_spec(
    cfg: RunConfig, image: tuple[int, ...], in_channels: int, classes: int, model: Any
) -> StepSpec:
    """The memory model's view of one training step of run ``cfg`` on a (padded) image of
    shape ``image`` with ``model`` (a haloseg UNet)."""
    t, m = cfg.train, cfg.memory
    amp = t.amp and cfg.device != "cpu"
    dtype_bytes = 8 if t.dtype == "float64" else (2 if amp else 4)
    return StepSpec(
        spatial_dims=len(image), in_channels=in_channels, classes=classes,
        channels=tuple(model.channels), convs_per_level=model.convs_per_level,
        norm=model.norm, upsampling=model.upsampling, image=tuple(image),
        grid=tuple(cfg.parallel.grid) if cfg.parallel.grid else None, batch=t.batch_size,
        data=cfg.parallel.data, dtype_bytes=dtype_bytes,
        param_bytes=8 if t.dtype == "float64" else 4, swap=m.swap,
        swap_min_bytes=m.swap_min_bytes,
        swap_budget=parse_bytes(m.swap_budget) if m.swap_budget else 0,
        prefetch=m.prefetch, checkpoint=m.checkpoint,
    )  # fmt: skip
