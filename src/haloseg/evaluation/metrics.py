"""Dice and HD95 of one case held in memory, as MONAI computes them.

Every class and named region is scored on its bounding box only (see :func:`_box`); torch and
MONAI are imported on first use so that ``import haloseg`` stays light.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from haloseg.errors import ConfigError, DataError
from haloseg.evaluation.settings import EvaluationSettings

__all__ = ["RESAMPLE_HINT", "evaluate_case", "label_sets", "prepare_labels", "score_case"]

RESAMPLE_HINT = (
    "resample the prediction onto the label's grid or re-run haloseg infer on the label's image"
)
"""The fix for a prediction that does not lie on its label's grid."""


def evaluate_case(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    num_classes: int,
    regions: dict[str, list[int]] | None = None,
    spacing: Sequence[float] | None = None,
    ignore_label: int | None = None,
) -> dict[str, float]:
    """Dice and HD95 of one case: ``dice_class1 .. dice_class{N-1}``, ``dice_<region>``,
    then the same ``hd95_*``. ``pred`` and ``label`` are label maps of one shape
    ``(*spatial)``; ``spacing`` (one per spatial dim) puts HD95 in physical units."""
    EvaluationSettings(
        num_classes=num_classes, regions=dict(regions or {}), ignore_label=ignore_label
    )
    pred, label = prepare_labels(
        pred, label, num_classes, ignore_label, ("the prediction", "the label")
    )
    return score_case(pred, label, label_sets(num_classes, regions, ignore_label), spacing)


def prepare_labels(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    ignore: int | None,
    names: tuple[str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """Checked label maps with the ignored voxels made background in both."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise DataError(
            f"{names[0]} has shape {pred.shape} but {names[1]} has {label.shape}; {RESAMPLE_HINT}"
        )
    _check_values(pred, names[0], num_classes, None, label=False)
    _check_values(label, names[1], num_classes, ignore, label=True)
    if ignore is not None:
        ignored = label == ignore
        if ignored.any():
            pred, label = np.where(ignored, 0, pred), np.where(ignored, 0, label)
    return pred, label


def _check_values(
    array: np.ndarray, name: str, num_classes: int, ignore: int | None, *, label: bool
) -> None:
    """Integer class labels in ``0..num_classes-1`` (or the ignore label, in a label)."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name} has dtype {array.dtype}; expected integer class labels")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DataError(
            f"{name} holds non-integer values; expected class labels, e.g. the "
            "output of haloseg infer --output-type labels"
        )
    if ignore is not None:
        array = np.where(array == ignore, 0, array)
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        fix = "class labels cannot be negative"
        if low >= 0:
            fix = f"pass --num-classes {high + 1}"
            fix += (
                f" or --ignore-label {high} if it marks unlabelled voxels"
                if label and ignore is None
                else ""
            )
        raise DataError(
            f"{name} has values {low}..{high} but num_classes={num_classes} allows "
            f"0..{num_classes - 1}; {fix}"
        )


def label_sets(
    num_classes: int, regions: Mapping[str, Sequence[int]] | None, ignore: int | None
) -> dict[str, list[int]]:
    """Column stem -> labels: ``class1..``, then the regions."""
    sets = {f"class{c}": [c] for c in range(1, num_classes) if c != ignore}
    for name, labels in (regions or {}).items():
        outside = [v for v in labels if not 0 <= v < num_classes]
        if outside:
            raise ConfigError(
                f"region {name!r}={list(labels)} has label {outside[0]} outside "
                f"0..{num_classes - 1}; fix the region or --num-classes"
            )
        sets[name] = list(labels)
    return sets


def score_case(
    pred: np.ndarray,
    label: np.ndarray,
    sets: Mapping[str, list[int]],
    spacing: Sequence[float] | None,
) -> dict[str, float]:
    """``dice_<stem>`` then ``hd95_<stem>`` of every label set of checked label maps."""
    if spacing is not None and len(spacing) != label.ndim:
        raise ConfigError(
            f"spacing {tuple(spacing)} has {len(spacing)} values for "
            f"{label.ndim}-D images; give one per spatial dim"
        )
    dice, hd95 = {}, {}
    for stem, labels in sets.items():
        p, t = _mask(pred, labels), _mask(label, labels)
        box = _box(p | t)
        if box is None or not t[box].any():  # no ground truth: NaN, as ignore_empty=True
            dice[f"dice_{stem}"] = hd95[f"hd95_{stem}"] = math.nan
            continue
        p, t = np.ascontiguousarray(p[box]), np.ascontiguousarray(t[box])
        dice[f"dice_{stem}"] = _dice(p, t)
        # A missed structure is infinitely far: MONAI's percentile of its infinite distances
        # is NaN, which would drop the case from the mean and flatter the model.
        hd95[f"hd95_{stem}"] = _hd95(p, t, spacing) if p.any() else math.inf
    return dice | hd95


def _mask(array: np.ndarray, labels: list[int]) -> np.ndarray:
    return array == labels[0] if len(labels) == 1 else np.isin(array, labels)


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by one voxel: the metrics only see the foreground,
    and MONAI crops to the same box (margin 1), so cropping first changes no value and keeps
    its float copies small."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return tuple(box)


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    import torch
    from monai.metrics import compute_dice

    value = compute_dice(
        torch.from_numpy(p)[None, None],
        torch.from_numpy(t)[None, None],
        include_background=True,
        ignore_empty=True,
    )
    return float(value.item())


def _hd95(p: np.ndarray, t: np.ndarray, spacing: Sequence[float] | None) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_mask_edges:always_return_as_numpy")
        value = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(t)[None, None],
            include_background=True,
            percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing],
        )
    return float(value.item())
