"""``memory.executor=layerwise``: the network trained whole-image, node by node over blocks.

The plain network is wrapped in ``LayerwiseModule``, so the trainer's step is unchanged: its
forward keeps every layer's output in the store (host memory or ``memory.store``, a zarr
folder), ``loss.backward()`` sweeps the layers in reverse block by block. The block is
``memory.block``, or the largest within ``memory.device_memory`` for the largest training
image, or 64 voxels per side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from haloseg.config import RunConfig
from haloseg.data.base import Dataset
from haloseg.errors import ConfigError
from haloseg.layerwise import LayerwiseModule
from haloseg.training.samples import padded_shape
from haloseg.training.setup import Layout

__all__ = ["DEFAULT_BLOCK", "build_layerwise_model", "configured_block", "layerwise_block"]

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 64


def configured_block(cfg: RunConfig, model: nn.Module, shape: Sequence[int],
                     dtype: torch.dtype, *, steps: list | None = None
                     ) -> tuple[tuple[int, ...], str]:  # fmt: skip
    """The block of a layer-wise run on images of ``shape`` (N, C, *spatial) and where it
    comes from: ``memory.block``, else the fewest blocks whose training step fits
    ``memory.device_memory``, else 64 voxels per side. ``steps``: the training trace, if made."""
    n = len(shape) - 2
    block = cfg.memory.block
    if block is not None:
        if len(block) not in (1, n):
            raise ConfigError(
                f"memory.block={block} has {len(block)} values for {n}-D images; give one "
                f"value or {n}, e.g. memory.block={[block[0]] * n}"
            )
        return tuple(block * n if len(block) == 1 else block), "memory.block"
    budget = cfg.memory.device_memory
    if budget is None:
        return (DEFAULT_BLOCK,) * n, "the default"
    from haloseg.layerwise.budget import block_for_budget
    from haloseg.units import parse_bytes

    found = block_for_budget(model, shape, dtype, parse_bytes(budget), train=True, steps=steps,
                             flag="memory.device_memory")  # fmt: skip
    return found, f"the fewest within memory.device_memory={budget}"


def layerwise_block(cfg: RunConfig, model: nn.Module, dataset: Dataset, layout: Layout,
                    dtype: torch.dtype) -> tuple[int, ...]:  # fmt: skip
    """The run's block for its largest training image (padded as training pads it)."""
    largest = max((tuple(dataset.info(i).shape) for i in range(len(dataset))), key=math.prod)
    if cfg.data.pad:
        largest = padded_shape(largest, layout.dec.align, layout.dec.grid)
    shape = (cfg.train.batch_size, dataset.in_channels, *largest)
    return configured_block(cfg, model, shape, dtype)[0]


def build_layerwise_model(cfg: RunConfig, model: nn.Module, dataset: Dataset, layout: Layout,
                          dtype: torch.dtype) -> LayerwiseModule:  # fmt: skip
    """``model`` wrapped to train layer-wise on ``layout``'s device."""
    block = layerwise_block(cfg, model, dataset, layout, dtype)
    log.info("layer-wise training with blocks of %s voxels, activations in %s",
             "x".join(map(str, block)), cfg.memory.store)  # fmt: skip
    return LayerwiseModule(model, block=block, device=layout.device, store=cfg.memory.store)
