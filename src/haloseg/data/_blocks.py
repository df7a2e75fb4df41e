"""Checks every reader applies to a block once it is in memory: dtype, finiteness, label range."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from haloseg.data.base import check_finite
from haloseg.errors import DataError

__all__ = ["check_index", "image_block", "label_block", "select_indices"]


def image_block(block: np.ndarray, name: str) -> np.ndarray:
    """``block`` as float32 after refusing NaN or Inf."""
    image = np.ascontiguousarray(block, dtype=np.float32)
    check_finite(image, name)
    return image


def label_block(
    block: np.ndarray, name: str, num_classes: int, ignore_label: int | None = None
) -> np.ndarray:
    """``block`` as int64 after checking it holds whole class ids in ``[0, num_classes)``
    (or ``ignore_label``)."""
    block = np.asarray(block)
    if block.dtype.kind == "f" and not np.array_equal(block, np.rint(block)):
        raise DataError(
            f"{name} holds non-integer label values; expected class ids 0..{num_classes - 1}, "
            "store the label map as integers"
        )
    label = np.ascontiguousarray(block, dtype=np.int64)
    classes = label if ignore_label is None else label[label != ignore_label]
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        label = classes
        raise DataError(
            f"{name} holds label values {int(label.min())}..{int(label.max())}; expected "
            f"0..{num_classes - 1} for num_classes={num_classes}; remap the labels, raise "
            "num_classes or name the value data.ignore_label"
        )
    return label


def check_index(index: int, length: int, what: str) -> int:
    """``index`` after checking it selects one of ``length`` samples (IndexError ends loops)."""
    if not 0 <= index < length:
        raise IndexError(f"sample {index} of {what} is out of range; it has {length} samples")
    return index


def select_indices(indices: Sequence[int] | None, length: int, what: str) -> list[int]:
    """The samples ``indices`` picks out of ``length`` (all when ``None``), each checked."""
    if indices is None:
        return list(range(length))
    bad = [i for i in indices if not 0 <= i < length]
    if bad:
        raise DataError(
            f"indices {bad} are outside {what}, which has {length} samples; "
            f"use indices in 0..{length - 1}"
        )
    return list(indices)
