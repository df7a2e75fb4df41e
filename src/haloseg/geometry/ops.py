"""The geometry of each spatial operation, from its arguments: per-axis window rules, the
fill at the image border, and whether it is pointwise, local or needs global statistics.

These are the only places where a layer's arguments become window arithmetic; the registry
(``haloseg.geometry.registry``) maps modules and functional calls to them, and the
partitioned layers, the receptive-field analysis and the planners all read the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from haloseg.geometry.rules import AxisRule, ConvAxis, IndexAxis, TransposedConvAxis, same_padding

__all__ = [
    "Geometry",
    "InterpAxis",
    "Unsupported",
    "conv",
    "conv_transpose",
    "global_statistics",
    "interpolate",
    "pad",
    "pointwise",
    "pool",
    "tuple_of",
]

Fill = float | str
"""Out-of-image fill: a constant (0.0, -inf) or an ``F.pad`` mode ('reflect', 'replicate')."""

INTERP_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear")


class Unsupported(Exception):  # noqa: N818 - a reason, raised to the caller who names the layer
    """An operation that cannot be partitioned exactly; the message is the reason."""


@dataclass(frozen=True)
class Geometry:
    """What an operation means for blocks of an image.

    ``kind``: ``pointwise`` (each output voxel from the same input voxel; channels may mix),
    ``local`` (a window of the input per output, by ``rules``), ``global`` (statistics or a
    reduction over the whole image: ``reason`` says which), or ``composite`` (a module whose
    forward is made of other operations, each judged on its own).
    """

    kind: str
    rules: Callable[[Sequence[int]], list[AxisRule]] | None = field(default=None, compare=False)
    """Per-axis rules, given the global input size per spatial axis."""
    fill: Fill = 0.0
    periodic: bool = False
    """The border wraps around the image (circular padding)."""
    reason: str = ""

    def axis_rules(self, sizes: Sequence[int]) -> list[AxisRule]:
        if self.rules is None:
            return [ConvAxis(1)] * len(sizes)
        return self.rules(sizes)


def tuple_of(v: Any, n: int) -> tuple:
    """``v`` as an ``n``-tuple (a scalar repeated, a sequence kept)."""
    return tuple(v) if isinstance(v, (tuple, list, torch.Size)) else (v,) * n


def pointwise() -> Geometry:
    return Geometry("pointwise")


def global_statistics(reason: str) -> Geometry:
    return Geometry("global", reason=reason)


def _static(rules: list[AxisRule]) -> Callable[[Sequence[int]], list[AxisRule]]:
    return lambda sizes: rules


def conv(
    n: int, kernel: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
    padding_mode: str = "zeros",
) -> Geometry:  # fmt: skip
    """``ConvNd`` / ``F.convNd``: any kernel, stride, dilation, padding (incl. 'same', 'valid')."""
    k, s, d = tuple_of(kernel, n), tuple_of(stride, n), tuple_of(dilation, n)
    if padding == "same":
        pads = [same_padding(k[i], d[i]) for i in range(n)]
    elif padding == "valid":
        pads = [(0, 0)] * n
    else:
        pads = [(p, p) for p in tuple_of(padding, n)]
    rules: list[AxisRule] = [ConvAxis(k[i], s[i], *pads[i], d[i]) for i in range(n)]
    if all(r == ConvAxis(1) for r in rules):
        return pointwise()
    padded = any(p != (0, 0) for p in pads)
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise Unsupported(f"padding_mode={padding_mode!r} is not supported")
    fill: Fill = 0.0 if padding_mode in ("zeros", "circular") else padding_mode
    return Geometry("local", _static(rules), fill, padding_mode == "circular" and padded)


def conv_transpose(
    n: int, kernel: Any, stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
    dilation: Any = 1,
) -> Geometry:  # fmt: skip
    """``ConvTransposeNd`` / ``F.conv_transposeNd``."""
    k, s, d = tuple_of(kernel, n), tuple_of(stride, n), tuple_of(dilation, n)
    p, op = tuple_of(padding, n), tuple_of(output_padding, n)
    rules: list[AxisRule] = [TransposedConvAxis(k[i], s[i], p[i], op[i], d[i]) for i in range(n)]
    return Geometry("local", _static(rules))


def pool(
    n: int, kernel: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
    ceil_mode: bool = False, *, is_max: bool,
) -> Geometry:  # fmt: skip
    """Max and average pooling (``nn.MaxPoolNd``/``AvgPoolNd`` and ``F.*_poolNd``)."""
    k = tuple_of(kernel, n)
    s = tuple_of(stride if stride not in (None, []) else kernel, n)
    p, d = tuple_of(padding, n), tuple_of(dilation, n)
    rules: list[AxisRule] = [ConvAxis(k[i], s[i], p[i], p[i], d[i], ceil_mode) for i in range(n)]
    return Geometry("local", _static(rules), -float("inf") if is_max else 0.0)


def pad(
    n: int, widths: Sequence[int], mode: str = "constant", value: float | None = None
) -> Geometry:
    """``F.pad`` and the pad modules: the first ``2n`` widths pad (or crop, when negative) the
    spatial axes, last axis first; further widths pad channels, which is pointwise."""
    widths = list(widths)
    if len(widths) % 2:
        raise Unsupported(f"pad={widths} has an odd number of entries")
    spatial = widths[: 2 * n] + [0] * max(0, 2 * n - len(widths))
    # F.pad lists the last axis first.
    pairs = [(spatial[2 * (n - 1 - i)], spatial[2 * (n - 1 - i) + 1]) for i in range(n)]
    if not any(lo or hi for lo, hi in pairs):
        return pointwise()
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise Unsupported(f"mode={mode!r} is not supported; use constant, reflect or replicate")
    rules: list[AxisRule] = [ConvAxis(1, 1, lo, hi) for lo, hi in pairs]
    fill: Fill = float(value or 0.0) if mode in ("constant", "circular") else mode
    return Geometry("local", _static(rules), fill, mode == "circular")


@dataclass(frozen=True, eq=False)
class InterpAxis(IndexAxis):
    weight: torch.Tensor | None = None
    """Linear modes: the weight of the last source index, per output."""


def interpolate(
    n: int, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
    align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
) -> Geometry:  # fmt: skip
    """``F.interpolate`` / ``nn.Upsample`` by a ``size`` (global) or a constant
    ``scale_factor``: PyTorch's own source indices and weights, per output voxel."""
    if mode not in INTERP_MODES:
        raise Unsupported(f"mode={mode!r} is not supported; use nearest or (bi/tri)linear")
    if (size is None) == (scale_factor is None):
        raise Unsupported("give exactly one of size and scale_factor")

    def rules(sizes: Sequence[int]) -> list[AxisRule]:
        return [
            interp_axis(sizes[i], i, n, size, scale_factor, mode, align_corners,
                        recompute_scale_factor)
            for i in range(n)
        ]  # fmt: skip

    return Geometry("local", rules)


def interp_axis(
    n_in: int, axis: int, n: int, size: Any, scale_factor: Any, mode: str,
    align_corners: bool | None, recompute_scale_factor: bool | None,
) -> InterpAxis:  # fmt: skip
    """Per output: first source index, last source index + 1, weight of the last."""
    src = torch.arange(n_in, dtype=torch.float64).view(1, 1, n_in)
    linear = mode in ("linear", "bilinear", "trilinear")
    kwargs: dict[str, Any] = {"mode": "linear" if linear else mode}
    if size is not None:
        kwargs["size"] = tuple_of(size, n)[axis]
    else:
        kwargs["scale_factor"] = tuple_of(scale_factor, n)[axis]
        kwargs["recompute_scale_factor"] = recompute_scale_factor
    if linear:
        kwargs["align_corners"] = align_corners
    pos = F.interpolate(src, **kwargs).view(-1)
    if not linear:
        idx = pos.round().long().tolist()
        return InterpAxis(tuple(idx), tuple(i + 1 for i in idx), None)
    first = pos.floor().clamp(max=n_in - 1)
    lam = pos - first
    last = (first + (lam > 0).double()).long()
    return InterpAxis(tuple(first.long().tolist()), tuple((last + 1).tolist()), lam)
