"""The accuracy study's shared parts: nnU-Net's patch sampling, one plain training loop that
every arm runs, sliding-window and whole-image prediction, and Dice per class.

The arms differ only in what ``train`` is fed; the loss, optimizer and schedule are these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from haloseg.parallel import Decomposition, cross_entropy, global_sum

__all__ = [
    "FOREGROUND_SHARE",
    "Patch",
    "PatchSampler",
    "batch_dice_loss",
    "dice_per_class",
    "lr_factor",
    "predict_windows",
    "train",
]

FOREGROUND_SHARE = 1 / 3
"""Share of patches centred on a foreground voxel (nnU-Net's oversample_foreground_percent)."""

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``step -> (image (N, 1, *spatial), label (N, *spatial))``: what one arm feeds a step."""


@dataclass(frozen=True)
class Patch:
    """One sampled patch."""

    image: int
    """Index of the image it is cut from."""
    box: tuple[tuple[int, int], ...]
    """Half-open ``(lo, hi)`` per spatial dim, inside the image."""
    foreground: bool
    """Drawn as a foreground patch (centred on a voxel of an object class, then clipped)."""


class PatchSampler:
    """Random patches fully inside the images, a third of them on foreground (nnU-Net).

    Each patch picks an image uniformly. With probability ``FOREGROUND_SHARE`` it is then
    centred on a random voxel of a class drawn uniformly from the object classes present in
    that image (nnU-Net's class-balanced oversampling) and shifted to lie inside the image;
    otherwise its corner is uniform over all positions that keep it inside (MONAI's
    ``RandSpatialCropd(random_center=True)``). ``labels`` is ``(N, *spatial)``.
    """

    def __init__(
        self, labels: np.ndarray, classes: Sequence[int], rng: np.random.Generator
    ) -> None:
        self.shape = labels.shape[1:]
        self.rng = rng
        # Voxel lists once per image and class, as nnU-Net's class_locations.
        self.locations = [
            [where for c in classes if len(where := np.argwhere(label == c))] for label in labels
        ]

    def sample(self, side: int, count: int) -> list[Patch]:
        """``count`` patches of ``side`` along every spatial dim."""
        return [self._one(side) for _ in range(count)]

    def _one(self, side: int) -> Patch:
        index = int(self.rng.integers(len(self.locations)))
        present = self.locations[index]
        if present and self.rng.random() < FOREGROUND_SHARE:
            voxels = present[int(self.rng.integers(len(present)))]
            centre = voxels[int(self.rng.integers(len(voxels)))]
            lo = [min(max(int(c) - side // 2, 0), n - side) for c, n in zip(centre, self.shape)]
            return Patch(index, tuple((a, a + side) for a in lo), True)
        lo = [int(self.rng.integers(n - side + 1)) for n in self.shape]
        return Patch(index, tuple((a, a + side) for a in lo), False)


def batch_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, dec: Decomposition, *, smooth: float = 1e-5
) -> torch.Tensor:
    """``1 - mean over classes of 2|P∩T| / (|P| + |T|)``, softmax probabilities summed over
    the whole batch and every block (nnU-Net's ``batch_dice``): a step's Dice term covers the
    same voxels however the step's voxels are cut into patches."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs)
    dims = (0, *range(2, logits.dim()))
    sums = torch.stack([(probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)])
    inter, p, t = global_sum(sums, dec).unbind(0)
    return 1 - ((2 * inter + smooth) / (p + t + smooth)).mean()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 at ``steps`` (haloseg train's schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train(
    model: nn.Module,
    batches: Batches,
    steps: int,
    dec: Decomposition,
    *,
    lr: float,
    weight_decay: float,
    warmup: int,
) -> list[float]:
    """Train ``model`` for ``steps`` steps of AdamW on cross-entropy + batch Dice; return
    each step's loss. ``dec`` is the image's decomposition (one block in one process)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    model.train()
    losses = []
    for step in range(steps):
        image, label = batches(step)
        logits = model(image)
        loss = cross_entropy(logits, label, dec) + batch_dice_loss(logits, label, dec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict_windows(model: nn.Module, image: torch.Tensor, side: int, batch: int) -> torch.Tensor:
    """Logits of ``image (1, 1, *spatial)`` by MONAI's sliding window: windows of ``side``,
    overlap 0.5, gaussian blending (nnU-Net's inference), ``batch`` windows at a time."""
    from monai.inferers import sliding_window_inference

    roi = (side,) * (image.dim() - 2)
    return sliding_window_inference(image, roi, batch, model, overlap=0.5, mode="gaussian")


def dice_per_class(pred: np.ndarray, label: np.ndarray, classes: Sequence[int]) -> list[float]:
    """``2|P∩T| / (|P| + |T|)`` of each class in two label maps; NaN where the class is in
    neither (nnU-Net leaves such cases out of the mean)."""
    out = []
    for c in classes:
        p, t = pred == c, label == c
        total = int(p.sum()) + int(t.sum())
        out.append(2 * int((p & t).sum()) / total if total else float("nan"))
    return out
