"""What layer-wise execution costs, counted from the steps, not measured: device bytes per
block, the block to use within a device budget, host bytes of the stores and host-link
traffic.

Layer by layer, the device holds the model's parameters and, for one block of one unit (a
node and the pointwise chain fused into it), the tensors the executor makes: the input
window(s) read from the store, the block's output and that of a fused activation, and the
temporaries of interpolation (one gather and blend per axis) and of normalisation. The
backward of a training step holds more for the same block: the windows again as their
gradient, the head's output and every fused output kept by autograd, the output block's
gradient and the normalisation's backward temporaries. The largest of these over all units,
for the largest window any block of the unit reads, is the block's cost; it grows with the
block and not with the image, so the largest block within the budget follows by bisection
(then evened out: as many blocks per axis, as small as that allows).

The host holds every node's whole output in a store: in inference each is freed after its
last reader; in training each is kept until the backward of its first reader has run, and
the gradients get stores of their own, from the backward of a node's last reader to that of
its own unit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import fx, nn

from haloseg.errors import ConfigError
from haloseg.layerwise import kernels
from haloseg.layerwise.alias import functionalise
from haloseg.layerwise.fusion import pointwise_chains
from haloseg.layerwise.graph import Step, plan_steps
from haloseg.layerwise.window import blocks_of
from haloseg.units import format_bytes

__all__ = [
    "MARGIN",
    "block_bytes",
    "block_for_budget",
    "link_bytes",
    "parameter_bytes",
    "store_bytes",
]

log = logging.getLogger(__name__)

MARGIN = 0.75
"""Share of a device budget the counted tensors may fill. Kernels allocate outside tensors
too (convolution workspaces, oneDNN scratch): a quarter is held back for them, as the tile
planner holds it back."""

# Training holds the weights, their gradients and AdamW's two moments on the device.
_TRAIN_COPIES = 4
_COMPUTED = ("pointwise", "local", "norm")


def _readable(nbytes: float) -> str:
    unit = "GiB" if nbytes >= 2**30 else "MiB" if nbytes >= 2**20 else "KiB"
    return format_bytes(nbytes, unit)


def _size(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _functional(steps: list[Step]) -> list[Step]:
    """Copies of ``steps`` whose reads name the values they see (an in-place write as a new
    value), as the executor runs them."""
    steps = [replace(s, images=list(s.images)) for s in steps]
    functionalise(steps)
    return steps


def _units(steps: list[Step]) -> list[tuple[int, Step, list[Step]]]:
    """(index, head, fused chain) of every step computed over blocks, in graph order."""
    chains = pointwise_chains(steps)
    fused = {f.node for chain in chains.values() for f in chain}
    return [(i, s, chains.get(i, [])) for i, s in enumerate(steps)
            if s.kind in _COMPUTED and s.node not in fused]  # fmt: skip


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


def _parts(step: Step, shapes: dict, block: list[int]) -> tuple[int, int, int]:
    """Device bytes of one block of ``step`` (its largest) in the forward: (input window(s),
    kernel output, temporaries)."""
    n, c_out, es = step.shape[0], step.shape[1], _size(step.dtype)
    voxels = math.prod(min(b, m) for b, m in zip(block, step.shape[2:], strict=True))
    out = n * c_out * voxels * es
    if step.kind == "norm":
        # Beside the block and the output: the block less the mean.
        return out, out, out
    if step.kind == "pointwise":
        inputs = 0
        for a in step.images:
            shape, dtype = shapes[a]
            own = math.prod(1 if k == 1 else min(b, m) for b, k, m in
                            zip(block, shape[2:], step.shape[2:], strict=True))  # fmt: skip
            inputs += shape[0] * shape[1] * own * _size(dtype)
        return inputs, out, 0
    shape, dtype = shapes[step.images[0]]
    wins, outs = _max_lengths(step, block)
    window = shape[0] * shape[1] * math.prod(wins) * _size(dtype)
    kernel_out = n * c_out * math.prod(outs) * es
    if kernels.execution(step) == "upsample":
        # Per axis: two gathers, their weighted copies and the sum, at most this large.
        widest = n * c_out * math.prod(max(w, o) for w, o in zip(wins, outs, strict=True)) * es
        return window, kernel_out, 4 * widest
    return window, kernel_out, 0


def _unit_bytes(step: Step, chain: list[Step], shapes: dict, block: list[int],
                train: bool) -> int:  # fmt: skip
    """Device bytes of one block of the unit ``step`` + ``chain``: its forward, and with
    ``train`` the larger of that and its backward."""
    inputs, out, temps = _parts(step, shapes, block)
    voxels = step.shape[0] * math.prod(min(b, m) for b, m in zip(block, step.shape[2:]))

    def block_of(s: Step) -> int:
        return s.shape[1] * voxels * _size(s.dtype)

    # A fused activation's output beside the block it is applied to.
    forward = inputs + out + temps + max((block_of(f) for f in chain), default=0)
    if not train:
        return forward
    last = chain[-1] if chain else step
    kept = sum(block_of(f) for f in chain)
    # The gradient handed down the chain to the head, beside the output block's own.
    through = block_of(step) if chain else 0
    temps = 5 * out if step.kind == "norm" else 2 * temps
    backward = 2 * inputs + out + kept + block_of(last) + through + temps
    return max(forward, backward)


def block_bytes(steps: list[Step], block: Sequence[int], image: Sequence[int], *,
                train: bool = False) -> int:  # fmt: skip
    """Device bytes the executor holds at once for ``block`` voxels of an ``image`` of that
    spatial size: the largest over the units of one block's windows, output and temporaries;
    with ``train``, of a training step's forward and backward."""
    steps = _functional(steps)
    shapes = {s.node: (s.shape, s.dtype) for s in steps if s.shape}
    worst = 0
    for _, step, chain in _units(steps):
        own = kernels.step_block(step, block, image)
        worst = max(worst, _unit_bytes(step, chain, shapes, own, train))
    return worst


def parameter_bytes(model: nn.Module, *, train: bool = False) -> int:
    """Bytes of the parameters and buffers that live on the compute device; with ``train``,
    the parameters' gradients and AdamW's two moments too."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (_TRAIN_COPIES if train else 1) + buffers


def block_for_budget(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, budget: int,
                     *, align: int = 1, train: bool = False, steps: list[Step] | None = None,
                     flag: str = "--max-memory") -> tuple[int, ...]:  # fmt: skip
    """A block of ``align``-multiple sides (cut to the image) whose layer-wise execution of an
    image of ``shape`` (N, C, *spatial) fits ``budget`` device bytes (with ``train``, whose
    training step fits): the fewest blocks per axis, each as small as that number allows.
    ``steps``: ``plan_steps(model, shape, dtype)`` if already made; ``flag``: the option that
    sets the budget, for the error."""
    steps = plan_steps(model, shape, dtype) if steps is None else steps
    spatial = list(shape[2:])
    weights = parameter_bytes(model, train=train)
    room = MARGIN * budget - weights

    def block(k: int) -> list[int]:
        return [min(k * align, n) for n in spatial]

    def cost(k: int) -> int:
        return block_bytes(steps, block(k), spatial, train=train)

    lo, hi = 1, max(1, math.ceil(max(spatial) / align))
    if cost(lo) > room:
        need = (cost(lo) + weights) / MARGIN
        raise ConfigError(
            f"a device budget of {_readable(budget)} fits no block: the smallest "
            f"({'x'.join(map(str, block(lo)))}) needs about {_readable(need)}; raise {flag}"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid - 1)
    # As many blocks, evened out: 2 of 256 rather than 336 + 176 along 512, for less memory.
    counts = [math.ceil(n / b) for n, b in zip(spatial, block(lo), strict=True)]
    chosen = tuple(min(n, align * math.ceil(math.ceil(n / k) / align))
                   for n, k in zip(spatial, counts, strict=True))  # fmt: skip
    log.info("layer-wise block %s (%d blocks) from a device budget of %s", chosen,
             len(blocks_of(spatial, chosen)), _readable(budget))  # fmt: skip
    return chosen


def _nbytes(step: Step) -> int:
    return math.prod(step.shape) * _size(step.dtype)


class _Stores:
    """The whole arrays held on the host, and the most ever held at once."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, fx.Node], int] = {}
        self.peak = 0

    def create(self, key: tuple[str, fx.Node], nbytes: int) -> None:
        self.held[key] = nbytes
        self.peak = max(self.peak, sum(self.held.values()))

    def free(self, key: tuple[str, fx.Node]) -> None:
        self.held.pop(key, None)


def _stores_of(steps: list[Step]) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, int]]:
    """Per image node, the node whose store holds its values (a fused chain's last; the
    input itself); per store, its bytes."""
    key = {s.node: s.node for s in steps if s.kind == "input"}
    size = {s.node: _nbytes(s) for s in steps if s.kind == "input"}
    for _, step, chain in _units(steps):
        last = chain[-1] if chain else step
        for t in (step, *chain):
            key[t.node] = last.node
        size[last.node] = _nbytes(last)
    return key, size


def store_bytes(steps: list[Step], *, train: bool = False, input_grad: bool = False) -> int:
    """Peak host bytes of the stores over one pass of ``steps``, as the executor frees them.
    The input image is the caller's tensor: not counted; its gradient only with
    ``input_grad`` (a training step needs none).

    Inference: a node's output is freed after its last reader, the network's output kept.
    Training: every output is kept through the forward; the network's output is freed
    before the backward (its gradient takes its place), every other once the backward of
    its first reader has run; a node's gradient is created at the backward of its last
    reader and freed once the backward of its own unit has consumed it."""
    steps = _functional(steps)
    key, size = _stores_of(steps)
    readers: dict[fx.Node, list[int]] = {}
    for i, s in enumerate(steps):
        at = len(steps) if s.kind == "output" else i
        reads = s.node.all_input_nodes if s.kind == "output" and not s.images else s.images
        for a in reads:
            if a in key:
                readers.setdefault(key[a], []).append(at)
    stores = _Stores()
    units = _units(steps)
    made = {i: key[step.node] for i, step, _ in units}
    for i in range(len(steps)):
        if i in made:
            stores.create(("out", made[i]), size[made[i]])
        for k, at in readers.items():
            if not train and max(at) == i:
                stores.free(("out", k))
    if train:
        image = steps[0].node if input_grad else None
        _backward(units, key, size, readers, stores, len(steps), image)
    return stores.peak


def _backward(units: list[tuple[int, Step, list[Step]]], key: dict[fx.Node, fx.Node],
              size: dict[fx.Node, int], readers: dict[fx.Node, list[int]], stores: _Stores,
              output_at: int, image: fx.Node | None) -> None:  # fmt: skip
    """The stores of the backward, unit by unit in reverse graph order; ``image``: the input
    node if its gradient is wanted."""
    at_unit = {i for i, _, _ in units}
    first = {k: min(at_unit.intersection(at)) for k, at in readers.items() if at_unit & set(at)}
    for k in readers:
        if k not in first:  # read by no layer: the network's output, its loss taken
            stores.free(("out", k))
    wanted = {key[s.node] for _, s, _ in units} | ({image} if image is not None else set())
    for k, at in readers.items():
        if output_at in at and k in wanted:
            stores.create(("grad", k), size[k])
    for i, step, _ in reversed(units):
        own = key[step.node]
        if ("grad", own) in stores.held:
            for k in (key[a] for a in step.images if a in key):
                if k in wanted and ("grad", k) not in stores.held:
                    stores.create(("grad", k), size[k])
            stores.free(("grad", own))
        for k, at in first.items():
            if at == i:
                stores.free(("out", k))


def _reads(step: Step, shapes: dict, block: list[int]) -> int:
    """Bytes ``step`` reads from the store over all its blocks of ``block``: the windows,
    less what lies past the image (the fill), once per block that reads them."""
    total = 0
    for a in step.images[:1] if step.kind == "local" else step.images:
        shape, dtype = shapes[a]
        per_axis = []
        for d, (m, b) in enumerate(zip(step.shape[2:], block, strict=True)):
            boxes = [(lo, min(lo + b, m)) for lo in range(0, m, b)]
            k = shape[2 + d]
            if step.kind == "local":
                spans = [step.rules[d].in_window(lo, hi) for lo, hi in boxes]
                per_axis.append(sum(max(0, min(hi, k) - max(lo, 0)) for lo, hi in spans))
            else:
                per_axis.append(len(boxes) if k == 1 else k)
        total += shape[0] * shape[1] * math.prod(per_axis) * _size(dtype)
    return total


def link_bytes(steps: list[Step], block: Sequence[int], image: Sequence[int], *,
               train: bool = False) -> int:  # fmt: skip
    """Bytes between the device and the store in one pass over ``block`` voxels of an
    ``image`` of that spatial size: every unit reads its windows (normalisation: twice, one
    sweep for the statistics) and writes its output. With ``train``, a training step: the
    backward reads the windows and the output's gradient again (normalisation: twice) and
    writes the windows' gradients. The loss on the network's output is not counted."""
    steps = _functional(steps)
    shapes = {s.node: (s.shape, s.dtype) for s in steps if s.shape}
    total = 0
    for _, step, chain in _units(steps):
        reads = _reads(step, shapes, kernels.step_block(step, block, image))
        out = _nbytes(chain[-1] if chain else step)
        sweeps = 2 if step.kind == "norm" else 1
        total += sweeps * reads + out
        if train:
            total += sweeps * (reads + out) + reads
    return total
