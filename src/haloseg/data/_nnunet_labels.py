"""The ``labels`` entry of an nnU-Net v2 ``dataset.json``: classes, regions, ignore value.

``labels`` maps names to class values; an entry that is a list of several values is a
*region* (a union of classes, nnU-Net's region-based training), and ``"ignore"`` names the
value of unannotated voxels. With ``regions_class_order`` the classes are the values the label
files hold: 0 and the entries of ``regions_class_order``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.data._blocks import label_block
from haloseg.errors import DataError

__all__ = ["Labels", "given_ignore", "label_values", "parse_labels"]


@dataclass(frozen=True)
class Labels:
    """The classes, regions and ignore value that ``labels`` in ``dataset.json`` declares."""

    num_classes: int
    names: list[str]
    regions: dict[str, list[int]]
    ignore_label: int | None


def parse_labels(labels: Mapping[str, Any], order: Any, path: Path) -> Labels:
    """Classes, class names, regions and ignore value of the ``labels`` entry."""
    entries = {name: _entry(name, value, path) for name, value in labels.items()}
    entries.pop("ignore", None)  # checked by _entry; not a class
    if entries.get("background") != [0]:
        raise DataError(
            f"{path}: labels has background {labels.get('background')!r}; nnU-Net requires "
            '"background": 0; add it or renumber the labels'
        )
    regions = {name: values for name, values in entries.items() if len(values) > 1}
    singles = {name: values[0] for name, values in entries.items() if len(values) == 1}
    foreground = sum(values != [0] for values in entries.values())
    classes = _class_values(singles, foreground, order, path)
    _check_members(entries, classes, path)
    names = [f"class{value}" for value in range(len(classes))]
    for name, value in singles.items():
        names[value] = name
    ignore_label = _ignore_label(labels.get("ignore"), len(classes), path)
    return Labels(len(classes), names, regions, ignore_label)


def _entry(name: str, value: Any, path: Path) -> list[int]:
    """The values of one ``labels`` entry: an integer, or a list of integers (a region)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataError(
            f"{path}: label {name!r} is {value!r}; expected a non-negative integer, or a list "
            "of them for a region"
        )
    if min(values) < 0:
        raise DataError(f"{path}: label {name!r} is {value!r}; label values must be >= 0")
    return values


def _class_values(singles: dict[str, int], foreground: int, order: Any, path: Path) -> list[int]:
    """The class values ``0 .. num_classes - 1``, checked to be distinct and consecutive."""
    if order is None:
        values = list(singles.values())
        duplicate = next((v for v in values if values.count(v) > 1), None)
        if duplicate is not None:
            named = [name for name, v in singles.items() if v == duplicate]
            raise DataError(
                f"{path}: labels {named} all have value {duplicate}; give each class its own value"
            )
        where = "labels"
    else:
        values = [0, *_regions_class_order(order, foreground, path)]
        where = "regions_class_order"
    missing = sorted(set(range(max(values) + 1)) - set(values))
    if missing:
        raise DataError(
            f"{path}: {where} skips class value(s) {missing}; nnU-Net expects consecutive "
            f"values 0..{max(values)}; renumber the labels"
        )
    return list(range(max(values) + 1))


def _regions_class_order(order: Any, regions: int, path: Path) -> list[int]:
    """``regions_class_order``: distinct positive integers, one per foreground label."""
    valid = isinstance(order, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in order
    )
    if not valid or len(order) != len(set(order)) or len(order) != regions:
        raise DataError(
            f"{path}: regions_class_order is {order!r}; expected {regions} distinct positive "
            "integers, the label value written for each non-background entry of labels"
        )
    return order


def _check_members(entries: dict[str, list[int]], classes: list[int], path: Path) -> None:
    """Refuse a label or region that names a value which is not a class."""
    for name, values in entries.items():
        stray = [v for v in values if v >= len(classes)]
        if stray:
            raise DataError(
                f"{path}: label {name!r} lists {stray}, which are not classes (0.."
                f"{len(classes) - 1}); add labels with these values or list them in "
                "regions_class_order"
            )


def _ignore_label(raw: Any, num_classes: int, path: Path) -> int | None:
    """The ignore value, checked to be one integer above every class.

    Every other label value is a class by now, so "above the classes" is "the highest".
    """
    if raw is None:
        return None
    if isinstance(raw, list):
        raise DataError(
            f"{path}: ignore label is {raw!r}; nnU-Net allows one integer, not a list; "
            f'give one value, e.g. "ignore": {num_classes}'
        )
    if raw < num_classes:
        raise DataError(
            f"{path}: ignore label {raw} is not above every other label value (highest "
            f"{num_classes - 1}); nnU-Net requires it to be the highest; renumber it to "
            f"{num_classes}"
        )
    return raw


def given_ignore(labels: Labels, given: int | None, path: Path) -> int | None:
    """The ignore value: dataset.json's, or ``given`` where it declares none."""
    declared = labels.ignore_label
    if given is None or given == declared:
        return declared
    if declared is not None:
        raise DataError(
            f'ignore_label={given} but {path} declares "ignore": {declared}; drop the '
            f"setting or make it {declared}"
        )
    if isinstance(given, bool) or not isinstance(given, int) or given < labels.num_classes:
        raise DataError(
            f"ignore_label={given!r} is not above the classes 0..{labels.num_classes - 1} of "
            f"{path}; give an integer >= {labels.num_classes}"
        )
    return given


def label_values(block: np.ndarray, name: str, labels: Labels) -> np.ndarray:
    """``block`` as int64, holding only class values and the ignore value."""
    ignore = labels.ignore_label
    if ignore is None:
        return label_block(block, name, labels.num_classes)
    label = label_block(block, name, ignore + 1)
    # An ignore value above num_classes leaves values between them that are neither.
    stray = (label >= labels.num_classes) & (label != ignore)
    if stray.any():
        raise DataError(
            f"{name} holds label value {int(label[stray].min())}; expected classes "
            f"0..{labels.num_classes - 1} or the ignore label {ignore}; remap the labels"
        )
    return label
