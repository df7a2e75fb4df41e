"""The block size from a compute-device budget, counted from the steps, not measured.

Layer by layer, the device holds the model's parameters and, for one block of one node, the
tensors the executor makes: the input window(s) read from the store, the block's output and
that of a fused activation, and the temporaries of interpolation (one gather and blend per
axis) and of normalisation. The largest of these over all nodes, for the
largest window any block of the node reads, is the block's cost; it grows with the block and
not with the image, so the largest block within the budget follows by bisection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from haloseg.errors import ConfigError
from haloseg.layerwise import kernels
from haloseg.layerwise.fusion import pointwise_chains
from haloseg.layerwise.graph import Step, plan_steps
from haloseg.layerwise.window import blocks_of
from haloseg.units import format_bytes

__all__ = ["block_bytes", "block_for_budget", "parameter_bytes"]

log = logging.getLogger(__name__)

# Kernels allocate outside tensors too (convolution workspaces, oneDNN scratch): a quarter of
# the budget is held back for them, as the tile planner holds it back.
_MARGIN = 0.75


def _readable(nbytes: float) -> str:
    unit = "GiB" if nbytes >= 2**30 else "MiB" if nbytes >= 2**20 else "KiB"
    return format_bytes(nbytes, unit)


def _size(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _max_lengths(step: Step, block: Sequence[int]) -> tuple[list[int], list[int]]:
    """Per axis, the longest input window and the longest kernel output of ``step``'s blocks."""
    wins, outs = [], []
    for rule, n, b in zip(step.rules, step.shape[2:], block, strict=True):
        spans = [rule.in_window(a, min(a + b, n)) for a in range(0, n, b)]
        win = max(hi - lo for lo, hi in spans)
        out = min(b, n)
        if kernels.execution(step) == "conv_transpose":
            out = (win - 1) * rule.stride + rule.dilation * (rule.kernel - 1) + 1  # type: ignore[attr-defined]
        wins.append(win)
        outs.append(out)
    return wins, outs


def _step_bytes(step: Step, shapes: dict, block: list[int]) -> int:
    """Device bytes of one block of ``step`` (its largest)."""
    c_out, es = step.shape[1], _size(step.dtype)
    voxels = math.prod(min(b, n) for b, n in zip(block, step.shape[2:], strict=True))
    if step.kind == "norm":
        # The block, the block less the mean, the normalised output.
        return 3 * c_out * voxels * es
    if step.kind == "pointwise":
        inputs = 0
        for a in step.images:
            shape, dtype = shapes[a]
            own = math.prod(1 if n == 1 else min(b, m) for b, n, m in
                            zip(block, shape[2:], step.shape[2:], strict=True))  # fmt: skip
            inputs += shape[1] * own * _size(dtype)
        return inputs + c_out * voxels * es
    shape, dtype = shapes[step.images[0]]
    wins, outs = _max_lengths(step, block)
    window = shape[1] * math.prod(wins) * _size(dtype)
    out = c_out * math.prod(outs) * es
    if kernels.execution(step) == "upsample":
        # Per axis: two gathers, their weighted copies and the sum, at most this large.
        widest = c_out * math.prod(max(w, o) for w, o in zip(wins, outs, strict=True)) * es
        return window + out + 4 * widest
    return window + out


def block_bytes(steps: list[Step], block: Sequence[int], image: Sequence[int]) -> int:
    """Device bytes the executor holds at once for ``block`` voxels of an ``image`` of that
    spatial size: the largest over the nodes of one block's windows, output and temporaries."""
    shapes = {s.node: (s.shape, s.dtype) for s in steps if s.shape}
    chains = pointwise_chains(steps)
    fused = {f.node for chain in chains.values() for f in chain}
    worst = 0
    for i, step in enumerate(steps):
        if step.kind in ("pointwise", "local", "norm") and step.node not in fused:
            own = kernels.step_block(step, block, image)
            # A fused activation's output beside the block it is applied to.
            extra = max((math.prod(own) * s.shape[1] * _size(s.dtype) for s in
                         chains.get(i, ())), default=0)  # fmt: skip
            worst = max(worst, _step_bytes(step, shapes, own) + extra)
    return worst


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that live on the compute device."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def block_for_budget(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, budget: int,
                     *, align: int = 1) -> tuple[int, ...]:  # fmt: skip
    """The largest block of ``align``-multiple sides (cut to the image) whose layer-wise
    execution of an image of ``shape`` (N, C, *spatial) fits ``budget`` device bytes."""
    steps = plan_steps(model, shape, dtype)
    spatial = list(shape[2:])
    room = _MARGIN * budget - parameter_bytes(model)

    def block(k: int) -> list[int]:
        return [min(k * align, n) for n in spatial]

    def cost(k: int) -> int:
        return block_bytes(steps, block(k), spatial)

    lo, hi = 1, max(1, math.ceil(max(spatial) / align))
    if cost(lo) > room:
        need = (cost(lo) + parameter_bytes(model)) / _MARGIN
        raise ConfigError(
            f"a device budget of {_readable(budget)} fits no block: the smallest "
            f"({'x'.join(map(str, block(lo)))}) needs about {_readable(need)}; "
            "raise --max-memory"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid - 1)
    chosen = tuple(block(lo))
    log.info("layer-wise block %s (%d blocks) from a device budget of %s", chosen,
             len(blocks_of(spatial, chosen)), _readable(budget))  # fmt: skip
    return chosen
