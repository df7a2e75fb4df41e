"""Per-axis window rules: which input indices a layer needs for a range of its outputs.

Each rule describes one spatial dimension of one layer:

- ``out_size(n)``: global output length for a global input length ``n``;
- ``in_window(a, b)``: the global input range ``[lo, hi)`` needed to compute outputs
  ``[a, b)``. It may reach outside ``[0, n)`` (padding) or be narrower than the owned block
  (a negative halo, e.g. valid convolutions);
- ``center(j)``: the input coordinate an output index belongs to, used to assign ownership of
  the outputs to the ranks that own the inputs.

All arithmetic is exact integer/rational arithmetic; nothing here touches tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from haloseg.errors import DecompositionError
from haloseg.geometry.blocks import Range

__all__ = [
    "AxisRule",
    "ConvAxis",
    "IndexAxis",
    "TransposedConvAxis",
    "out_bounds",
    "same_padding",
]


class AxisRule(Protocol):
    """What every per-axis layer rule provides."""

    def out_size(self, n: int) -> int: ...

    def in_window(self, a: int, b: int) -> Range: ...

    def center(self, j: int) -> Fraction: ...


def same_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """PyTorch's ``padding='same'`` split: the odd element of the total goes to the end."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class ConvAxis:
    """Convolution, pooling or cropping along one axis (cropping = kernel 1, negative padding)."""

    kernel: int
    stride: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        extent = n + self.pad_lo + self.pad_hi - self.span
        if not self.ceil_mode:
            return extent // self.stride + 1
        out = -(-extent // self.stride) + 1
        # PyTorch: the last pooling window must start inside the image or the left padding.
        if (out - 1) * self.stride >= n + self.pad_lo:
            out -= 1
        return out

    def in_window(self, a: int, b: int) -> Range:
        lo = a * self.stride - self.pad_lo
        if b <= a:
            return lo, lo
        return lo, (b - 1) * self.stride - self.pad_lo + self.span

    def center(self, j: int) -> Fraction:
        return j * self.stride - self.pad_lo + Fraction(self.span - 1, 2)


@dataclass(frozen=True)
class TransposedConvAxis:
    """Transposed convolution along one axis (PyTorch's ``ConvTransposeNd`` arithmetic)."""

    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1

    def out_size(self, n: int) -> int:
        k = self.dilation * (self.kernel - 1)
        return (n - 1) * self.stride - 2 * self.padding + k + self.output_padding + 1

    def in_window(self, a: int, b: int) -> Range:
        # Inputs that contribute to [a, b), widened so that the transposed convolution of the
        # window (with zeros beyond the image) covers all of [a, b) too.
        s, p, k = self.stride, self.padding, self.dilation * (self.kernel - 1)
        if b <= a:
            lo = (a + p) // s
            return lo, lo
        lo = min(-(-(a + p - k) // s), (a + p) // s)
        hi = max((b - 1 + p) // s + 1, -(-(b + p - k - 1) // s) + 1)
        return lo, hi

    def center(self, j: int) -> Fraction:
        k = self.dilation * (self.kernel - 1)
        return Fraction(2 * (j + self.padding) - k, 2 * self.stride)


@dataclass(frozen=True)
class IndexAxis:
    """A rule given by explicit per-output input ranges (interpolation).

    ``lo[j]`` and ``hi[j]`` bound the input indices output ``j`` reads; they come from the
    exact index arithmetic of the interpolation kernel.
    """

    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def out_size(self, n: int) -> int:
        return len(self.lo)

    def in_window(self, a: int, b: int) -> Range:
        if b <= a:
            return (self.lo[a], self.lo[a]) if a < len(self.lo) else (0, 0)
        return min(self.lo[a:b]), max(self.hi[a:b])

    def center(self, j: int) -> Fraction:
        return Fraction(self.lo[j] + self.hi[j] - 1, 2)


def out_bounds(in_bounds: Sequence[int], rule: AxisRule) -> list[int]:
    """Block boundaries of a layer's output, given the boundaries of its input along one axis.

    Whole-ratio resampling keeps blocks aligned (``c -> c / r`` down, ``c -> c * r`` up), so
    a U-Net's decoder blocks match its encoder skips; otherwise output ``j`` belongs to the
    rank owning input ``round(center(j))``.
    """
    n_in = in_bounds[-1]
    n_out = rule.out_size(n_in)
    if n_out <= 0:
        raise DecompositionError(
            f"{rule} turns an input of size {n_in} into an output of size {n_out}; use a "
            "larger image"
        )
    stride = getattr(rule, "stride", 1)
    down = isinstance(rule, ConvAxis) and stride > 1 and n_in == n_out * stride
    up = (isinstance(rule, TransposedConvAxis) and n_out == n_in * stride) or (
        isinstance(rule, IndexAxis) and n_out % n_in == 0
    )
    bounds = [0]
    for c in in_bounds[1:-1]:
        if n_out == n_in:
            d = c
        elif down and c % stride == 0:
            d = c // stride
        elif up:
            d = c * (n_out // n_in)
        else:
            d = _first_owned(c, rule, n_out)
        bounds.append(min(max(d, bounds[-1]), n_out))
    bounds.append(n_out)
    return bounds


def _first_owned(c: int, rule: AxisRule, n_out: int) -> int:
    """Smallest output index whose rounded center is at or beyond input index ``c``."""
    lo, hi = 0, n_out
    while lo < hi:
        mid = (lo + hi) // 2
        if math.floor(rule.center(mid) + Fraction(1, 2)) >= c:
            hi = mid
        else:
            lo = mid + 1
    return lo
