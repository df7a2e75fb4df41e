"""Validation metrics of predicted label maps, summed over every block of the whole image.

Dice per class (background excluded) and per named region (a union of labels, such as the
BraTS whole tumour / tumour core / enhancing tumour), as MONAI's ``DiceMetric`` computes
them per image (``ignore_empty=True``): 2|P∩T| / (|P| + |T|), an image whose ground truth
lacks the class left out of that class's mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from haloseg.parallel import Decomposition, global_sum

__all__ = ["DiceTracker"]


class DiceTracker:
    """Accumulates per-image Dice of classes ``1..num_classes-1`` and of ``regions``."""

    def __init__(self, num_classes: int, regions: Mapping[str, Sequence[int]] | None = None):
        regions = dict(regions or {})
        self.names = [f"dice_class{c}" for c in range(1, num_classes)]
        self.names += [f"dice_{name}" for name in regions]
        self._sets = [[c] for c in range(1, num_classes)] + [list(v) for v in regions.values()]
        self._total = torch.zeros(len(self.names), dtype=torch.float64)
        self._count = torch.zeros(len(self.names), dtype=torch.float64)

    def update(
        self, pred: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, dec: Decomposition
    ) -> None:
        """Add the images of one batch: ``pred``, ``label``, ``valid`` are ``(N, *block)``."""
        rows = []
        dims = tuple(range(1, pred.dim()))
        for labels in self._sets:
            want = torch.tensor(labels, device=pred.device)
            p = torch.isin(pred, want) & valid
            t = torch.isin(label, want) & valid
            rows.append(torch.stack([(p & t).sum(dims), p.sum(dims), t.sum(dims)]))
        inter, p, t = global_sum(torch.stack(rows).double().cpu(), dec).unbind(1)  # (sets, N)
        present = t > 0
        dice = torch.where(present, 2 * inter / (p + t).clamp(min=1), 0.0)
        self._total += dice.sum(1)
        self._count += present.sum(1)

    def compute(self, group: dist.ProcessGroup | None = None, *, reduce: bool = False) -> dict:
        """Mean Dice of each class and region and ``dice_mean`` over the classes; with
        ``reduce``, summed first over the ranks of ``group`` (the data replicas)."""
        both = torch.stack([self._total, self._count])
        if reduce:
            dist.all_reduce(both, group=group)
        mean = (both[0] / both[1]).tolist()
        out = dict(zip(self.names, mean, strict=True))
        classes = [v for n, v in out.items() if n.startswith("dice_class")]
        out["dice_mean"] = sum(classes) / len(classes)
        return out
