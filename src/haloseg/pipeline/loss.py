"""The loss at the end of a pipeline: labels and their valid mask in one target tensor.

A schedule splits one ``target`` tensor into micro-batches beside the input, so the label
map and the mask of voxels that count (not padding, not the ignore label) travel packed:
the label where valid, ``-1`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from haloseg.parallel import Decomposition, cross_entropy, soft_dice_loss

__all__ = ["pack_target", "segmentation_loss", "unpack_target"]

INVALID = -1


def pack_target(label: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``label (N, *block)`` with ``INVALID`` where ``valid`` is false, as int64."""
    label = label.long()
    return label if valid is None else label.masked_fill(~valid, INVALID)


def unpack_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(label, valid)`` of a packed target; invalid voxels get label 0."""
    valid = target != INVALID
    return target.clamp(min=0), valid


def segmentation_loss(
    dec: Decomposition, *, ce_weight: float = 1.0, dice_weight: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """haloseg's training loss on ``dec``'s blocks, ``loss(logits, packed target)``:
    cross-entropy plus soft Dice over the whole image of every sample."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        label, valid = unpack_target(target)
        ce = cross_entropy(logits, label, dec, valid=valid)
        wide = logits if logits.dtype == torch.float64 else logits.float()
        dice = soft_dice_loss(wide, label, dec, valid=valid)
        return ce_weight * ce + dice_weight * dice

    return loss
