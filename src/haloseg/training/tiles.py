"""Overlap-tile training (``parallel.mode=tiles``): sample parallelism as on Summit.

Each process of a spatial group trains the *plain* network on one tile: its block of the
padded image (the core, exactly the block halo exchange would give it) plus a halo of the
network's receptive field on every side, cut where the padded image ends, so the network's
zero padding acts exactly where it acts on the whole image. Nothing is exchanged inside the
network. Its logits are cut to the core, and the loss is the whole image's (sums over every
core), so each process holds the whole image's loss gradient on its core, and the parameter
gradients of all tiles add up to the whole image's. That is exact for networks of local
layers only: anything normalising over the image (BatchNorm in training mode, InstanceNorm,
GroupNorm, global pooling) is refused, naming the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from haloseg.data.base import Dataset
from haloseg.data.normalize import (
    apply_zscore,
    block_moments,
    normalization_mask,
    zscore_from_moments,
)
from haloseg.errors import ConfigError, UnsupportedLayerError
from haloseg.geometry.overlap import core_slices, tile_box
from haloseg.inference.receptive import _NORM_HINT as _INFERENCE_ADVICE
from haloseg.inference.receptive import ReceptiveField, receptive_field
from haloseg.memory.checkpoint import checkpoint_levels
from haloseg.parallel import Decomposition, global_sum
from haloseg.parallel.data import data_parallel
from haloseg.parallel.gradients import GradientSum
from haloseg.training.freeze import batch_norms
from haloseg.training.samples import Augment, Block, _read_augmented

if TYPE_CHECKING:
    from haloseg.config import RunConfig
    from haloseg.training.setup import Layout

__all__ = ["build_tile_model", "local_receptive_field", "read_tile_block"]


def local_receptive_field(model: nn.Module, spatial_dims: int) -> ReceptiveField:
    """The receptive field of ``model`` as it trains (its current modes), or a
    ``ConfigError`` naming the layer that makes tiles inexact and the fix."""
    try:
        return receptive_field(model, spatial_dims)
    except UnsupportedLayerError as e:
        # receptive_field's advice is about inference; training's follows.
        reason = str(e).replace(_INFERENCE_ADVICE, "")
        where = f"layer {reason}" if reason.startswith("'") else reason  # a layer's path
        unfrozen = any(m.training for _, m in batch_norms(model))
        fix = "use parallel.mode=halo (exact for every network)"
        if unfrozen:
            fix += ", or train.freeze_norm=true to normalise with BatchNorm's running statistics"
        raise ConfigError(
            f"parallel.mode=tiles trains each tile on its own, which is exact only for networks "
            f"of local layers, but {where}; {fix}"
        ) from None


def build_tile_model(
    cfg: RunConfig, model: nn.Module, layout: Layout
) -> tuple[nn.Module, nn.Module]:
    """(model to train, the module holding the weights) for tiles mode: ``model`` itself,
    its gradients summed over the spatial group (and averaged over data replicas). Sets the
    layout's alignment and halo."""
    model.train()
    rf = local_receptive_field(model, layout.dec.spatial_dims)
    layout.dec.align = max(layout.dec.align, rf.alignment)
    layout.halo = rf.halo
    if cfg.memory.checkpoint:
        checkpoint_levels(model)
    if layout.mesh is not None:
        # One all-reduce over every rank divided by the replicas: a sum over the tiles of an
        # image, a mean over the images of the replicas.
        return data_parallel(model, layout.mesh), model
    if layout.dec.size > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        model._hs_grad_sum = GradientSum(params, layout.dec)
    return model, model


def read_tile_block(
    dataset: Dataset,
    index: int,
    dec: Decomposition,
    padded: Sequence[int],
    aug: Augment,
    normalize: str,
    dtype: torch.dtype,
    ignore_label: int | None = None,
    *,
    halo: Sequence[int],
) -> Block:
    """This rank's tile of sample ``index`` (augmented frame, padded to ``padded``): the
    image over its block plus ``halo`` per side, label and ``valid`` over the block only.

    Only the tile is read. Normalisation statistics are the whole image's (sums over every
    rank's block), applied to the whole tile, so its halo holds what the neighbours hold.
    """
    core = dec.box(padded)
    box = tile_box(core, halo, padded)
    image, label, inside = _read_augmented(dataset, index, box, aug)
    pad = [(0, (hi - lo) - (b - a)) for (lo, hi), (a, b) in zip(box, inside, strict=True)]
    in_image = torch.from_numpy(np.pad(np.ones(label.shape, dtype=bool), pad))
    image_t = torch.from_numpy(np.pad(image, [(0, 0), *pad])).to(dtype)
    label_t = torch.from_numpy(np.pad(label, pad).astype(np.int64))
    keep = core_slices(core, box)
    if normalize != "none":
        image_t = _normalize(image_t, in_image, keep, dec, normalize)
    label_t, valid_t = label_t[keep].clone(), in_image[keep].clone()
    if ignore_label is not None:
        # As in halo mode: ignored voxels count in the image's statistics, not in the loss.
        ignored = label_t == ignore_label
        label_t[ignored] = 0
        valid_t &= ~ignored
    return Block(image_t, label_t, valid_t, keep)


def _normalize(
    image: torch.Tensor,
    in_image: torch.Tensor,
    keep: tuple[slice, ...],
    dec: Decomposition,
    scheme: str,
) -> torch.Tensor:
    """Z-score with the whole image's statistics: the moments of the cores (which tile the
    image once) summed over the group, applied to the whole tile."""
    mask = normalization_mask(image, in_image, scheme)
    core = (slice(None), *keep)
    moments = global_sum(block_moments(image[core], mask[core]), dec)
    mean, std = zscore_from_moments(moments)
    return apply_zscore(image, mean, std, mask)
