"""Pictures of a run: the training curve, and image / ground truth / prediction overlays."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from haloseg.plots import draw_labels, pyplot, save_figure
from haloseg.training.loop import Trainer
from haloseg.training.samples import Augment

__all__ = ["plot_curve", "preview", "save_overlays"]

PREVIEW_SIDE = 512


def plot_curve(history: Sequence[dict[str, float]], path: str | os.PathLike) -> None:
    """Training loss, validation loss and validation Dice against the step, as a PNG."""
    fig, (ax_loss, ax_dice) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    ax_loss.plot(steps, [h["loss"] for h in history], lw=1, label="training loss")
    val = [h for h in history if "val_loss" in h]
    ax_loss.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="Dice + cross-entropy loss", yscale="log")
    ax_loss.legend()
    for key in [k for k in (val[0] if val else {}) if k.startswith("dice_")]:
        ax_dice.plot([h["step"] for h in val], [h[key] for h in val], "o-", label=key[5:])
    ax_dice.set(xlabel="step", ylabel="validation Dice", ylim=(0, 1))
    ax_dice.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def _stride(shape: Sequence[int], align: int) -> int:
    """A power of two (dividing the block alignment) that brings the image near
    ``PREVIEW_SIDE``, so every block subsamples on the same lattice."""
    s = 1
    while max(shape) // (2 * s) >= PREVIEW_SIDE and align % (2 * s) == 0:
        s *= 2
    return s


@torch.no_grad()
def preview(trainer: Trainer, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first channel, label, prediction) of validation image ``index``, subsampled, whole.

    Runs on every rank of the spatial group (the forward pass and the gather are
    collective); 3-D images give their middle slice along the first spatial axis.
    """
    model, dec, dataset = trainer.model, trainer.layout.dec, trainer.val_set
    model.eval()
    identity = Augment.identity(dataset.spatial_dims)
    batch = trainer.batch(dataset, [(index, identity)])
    pred = batch.crop(model(batch.image)).argmax(1, keepdim=True)
    s = _stride(trainer.padded(dataset.info(index).shape), dec.align)
    sub = (slice(None), slice(None), *[slice(None, None, s)] * dataset.spatial_dims)
    stack = torch.cat([batch.crop(batch.image[:, :1]).double(), batch.label[:, None].double(),
                       pred.double(), batch.valid[:, None].double()], 1)  # fmt: skip
    whole = dec.gather(stack[sub].contiguous())[0].cpu().numpy()
    if dataset.spatial_dims == 3:
        whole = whole[:, whole.shape[1] // 2]
    keep = tuple(slice(0, math.ceil(n / s)) for n in dataset.info(index).shape[-2:])
    image, label, pred_np, _ = (w[keep] for w in whole)
    return image, label.astype(np.int64), pred_np.astype(np.int64)


def save_overlays(
    panels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    path: str | os.PathLike,
) -> None:
    """A PNG with one row per image: the image, ground truth over it, prediction over it."""
    fig, axes = pyplot().subplots(len(panels), 3, figsize=(9, 3 * len(panels)), squeeze=False)
    for row, (image, label, pred) in zip(axes, panels, strict=True):
        for ax, title, mask in zip(row, ("image", "ground truth", "prediction"),
                                   (None, label, pred)):  # fmt: skip
            ax.imshow(image, cmap="gray")
            if mask is not None:
                draw_labels(ax, mask)
            ax.set_title(title)
            ax.axis("off")
    fig.suptitle(f"{num_classes - 1} foreground classes; colour = class")
    fig.tight_layout()
    save_figure(fig, path)
