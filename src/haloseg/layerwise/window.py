"""Blocks of one node's output, and the input windows they read, filled past the image border.

Every node's output is cut into blocks of its own (the requested block scaled to the node's
resolution, the last block of an axis smaller when the size is not a multiple). A layer's
window for a block comes from the registry's per-axis rules and may reach past the image:
those voxels take the layer's fill (zeros, -inf for max-pooling) or mirror the image
('reflect', 'replicate'), exactly as the layer's own padding would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from haloseg.errors import DecompositionError
from haloseg.geometry import Box
from haloseg.layerwise.store import Store

__all__ = ["add_window", "blocks_of", "node_block", "own_box", "read_block", "read_window"]


def node_block(block: Sequence[int], image: Sequence[int], node: Sequence[int]) -> list[int]:
    """The block of a node whose spatial size is ``node``, for ``block`` voxels of the image:
    the same region at the node's resolution (half the voxels per axis after a 2x pooling)."""
    return [
        max(1, min(n, math.ceil(b * n / i))) for b, i, n in zip(block, image, node, strict=True)
    ]


def blocks_of(spatial: Sequence[int], block: Sequence[int]) -> list[Box]:
    """The boxes cutting ``spatial`` into blocks of ``block`` (the last ones smaller)."""
    axes = [
        [(a, min(a + b, n)) for a in range(0, n, b)] for n, b in zip(spatial, block, strict=True)
    ]
    return [tuple(box) for box in itertools.product(*axes)]


@dataclass(frozen=True)
class _Run:
    """A stretch of the window along one axis: image voxels ``[src, src + length)``, maybe in
    reverse order, or the constant fill (``src`` None)."""

    start: int
    length: int
    src: int | None
    reverse: bool = False


def _source(i: int, size: int, fill: float | str) -> int | None:
    if 0 <= i < size:
        return i
    if fill == "replicate":
        return min(max(i, 0), size - 1)
    if fill == "reflect":
        j = -i if i < 0 else 2 * (size - 1) - i
        if not 0 <= j < size:
            raise DecompositionError(
                f"reflect padding reaches index {i} of an axis of size {size}; the padding "
                "must be smaller than the size, as for F.pad"
            )
        return j
    return None


def _runs(lo: int, hi: int, size: int, fill: float | str) -> list[_Run]:
    """The window ``[lo, hi)`` of an axis of ``size`` as runs of consecutive image voxels."""
    src = [_source(i, size, fill) for i in range(lo, hi)]
    runs: list[_Run] = []
    k = 0
    while k < len(src):
        j = k + 1
        if src[k] is None:
            while j < len(src) and src[j] is None:
                j += 1
            runs.append(_Run(k, j - k, None))
        else:
            step = 1 if j >= len(src) or src[j] is None else src[j] - src[k]
            step = step if step in (1, -1) else 1
            while j < len(src) and src[j] is not None and src[j] - src[j - 1] == step:
                j += 1
            first = min(src[k], src[j - 1])
            runs.append(_Run(k, j - k, first, step == -1 and j - k > 1))
        k = j
    return runs


def _pieces(shape: Sequence[int], window: Box, fill: float | str):  # type: ignore[no-untyped-def]
    """Per piece of the window: where it lies in the window, the image box it shows (None:
    the fill) and the spatial dims it shows mirrored."""
    axes = [_runs(lo, hi, n, fill) for (lo, hi), n in zip(window, shape[2:], strict=True)]
    for runs in itertools.product(*axes):
        where = (slice(None), slice(None), *(slice(r.start, r.start + r.length) for r in runs))
        if any(r.src is None for r in runs):
            yield where, None, []
            continue
        box = tuple((r.src, r.src + r.length) for r in runs)  # type: ignore[operator]
        yield where, box, [2 + d for d, r in enumerate(runs) if r.reverse]


def read_window(
    store: Store, name: str, shape: Sequence[int], window: Box, fill: float | str,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """A new tensor on ``device``: the window ``window`` of the node ``name`` of ``shape``
    (N, C, *spatial), voxels past the image given by ``fill``."""
    lens = [hi - lo for lo, hi in window]
    out = torch.empty((*shape[:2], *lens), dtype=dtype, device=device)
    for where, box, flips in _pieces(shape, window, fill):
        if box is None:
            out[where].fill_(float(fill))  # type: ignore[arg-type]
            continue
        part = store.read(name, box)
        if flips:
            part = part.flip(flips)
        out[where].copy_(part, non_blocking=True)
    return out


def add_window(store: Store, name: str, shape: Sequence[int], window: Box, fill: float | str,
               grad: torch.Tensor) -> None:  # fmt: skip
    """Add ``grad``, the gradient of a window ``read_window`` read, into the gradient store
    ``name``: each voxel's gradient goes to the image voxel it showed (its mirror for
    'reflect', the edge for 'replicate', added as often as it was shown); the constant
    fill's gradient is dropped, as the layer's own padding drops it."""
    for where, box, flips in _pieces(shape, window, fill):
        if box is None:
            continue
        part = grad[where]
        store.add(name, box, part.flip(flips) if flips else part)


def read_block(
    store: Store, name: str, shape: Sequence[int], box: Box, device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The block ``box`` of an output of ``shape`` from a node that may broadcast (size 1 along
    an axis), as a new tensor on ``device``."""
    return read_window(store, name, shape, own_box(shape, box), 0.0, device, dtype)


def own_box(shape: Sequence[int], box: Box) -> Box:
    """``box`` of an output read by a node that may broadcast: (0, 1) along its size-1 axes."""
    return tuple((0, 1) if n == 1 else r for r, n in zip(box, shape[2:], strict=True))
