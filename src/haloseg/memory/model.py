"""The memory model: a training step of a haloseg U-Net replayed as allocations, no tensors.

``step_memory`` walks the forward of ``UNet`` (and the trainer's Dice + cross-entropy loss)
layer by layer as autograd runs it: which tensors each layer allocates, which it saves for
backward, when Python lets go of them; then the backward in reverse, allocating each
gradient and freeing what autograd frees (a saved tensor after its last use, a gradient
once consumed, the concatenation's gradient when both halves are used). The high-water mark
of the bytes alive is the step's peak. Swapping moves saved tensors to host when saved and
back ahead of their use (``prefetch`` layers early); checkpointing keeps only each level's
input and replays the level before its backward; a spatial grid shrinks every tensor to the
largest block and adds the halo slabs its convolutions keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from haloseg.config import SWAP_POLICIES
from haloseg.errors import ConfigError
from haloseg.memory.swap import SWAP_FLOOR

__all__ = ["MemoryBreakdown", "StepSpec", "step_memory"]


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """One training step to predict: the network, the image block, and the memory features."""

    spatial_dims: int
    in_channels: int
    classes: int
    channels: tuple[int, ...]
    """Channels per level, ``depth + 1`` of them."""
    convs_per_level: int = 2
    norm: str = "batch"
    upsampling: str = "transposed"
    image: tuple[int, ...]
    """Whole image, per spatial dim."""
    grid: tuple[int, ...] | None = None
    batch: int = 1
    """Images per device per micro-step."""
    data: int = 1
    """Data-parallel replicas (DDP keeps a second copy of the gradients in its buckets)."""
    dtype_bytes: int = 4
    """Bytes per activation element (4 fp32, 2 bf16 autocast, 8 fp64)."""
    param_bytes: int = 4
    swap: str = "none"
    """none | all | skips | min_bytes | budget."""
    swap_min_bytes: int = 1 << 20
    swap_budget: int = 0
    prefetch: int = 2
    checkpoint: bool = False
    optimizer_states: int = 2
    """Tensors of optimizer state per parameter (AdamW: 2)."""
    loss: str = "dice_ce"
    """dice_ce (the trainer's Dice + cross-entropy with a padding mask) | ce (plain
    ``F.cross_entropy``)."""

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    @property
    def block(self) -> tuple[int, ...]:
        """The largest block of the grid (blocks are aligned to ``2**depth``)."""
        grid = self.grid or (1,) * self.spatial_dims
        a = 2**self.depth
        return tuple(math.ceil(n / g / a) * a for n, g in zip(self.image, grid, strict=True))


@dataclass
class MemoryBreakdown:
    """Predicted peak bytes on one device, and what they are made of."""

    peak: int
    parameters: int
    gradients: int
    optimizer: int
    batch: int
    activations: int
    """Peak of everything the step allocates beyond the above (saved tensors, halos,
    gradients of activations, temporaries)."""
    halos: int
    swapped: int
    """Bytes moved to host memory per step."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Tensor:
    nbytes: int
    refs: int = 1
    """Python references and saved references held on the device."""
    host_refs: int = 0
    """Saved references held by a host copy."""
    on_host: bool = False
    device: bool = True
    grad: bool = True


@dataclass
class _Op:
    inputs: list[int]
    out: int
    saves: list[int]
    """What the op saves for backward when it runs with saving on."""
    saved: list[int] = field(default_factory=list)
    inplace: bool = False
    cat: bool = False
    """The input gradients are views of the output gradient (concatenation)."""
    region: int | None = None
    skip_level: bool = False
    params: int = 0
    """Parameters of the layer: their gradients appear when its backward runs."""
    extra: int = -1
    """A tensor the op allocates only to save it (pool indices, halo slabs)."""


class _Sim:
    """Allocation bookkeeping: live bytes, the peak, and the forward as a tape of events."""

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.tensors: list[_Tensor] = []
        self.live = self.peak = 0
        self.ops: list[_Op] = []
        self.events: list[tuple[str, object]] = []
        self.region: int | None = None
        self.skip_level = False
        self.swapped = self.kept_saved = self.halo = self.params = 0

    # -- allocation ------------------------------------------------------------------------
    def new(self, nbytes: int, *, grad: bool = True) -> int:
        self.tensors.append(_Tensor(int(nbytes), grad=grad))
        self._add(int(nbytes))
        return len(self.tensors) - 1

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def spike(self, nbytes: int) -> None:
        """A temporary that lives and dies inside one call."""
        self.peak = max(self.peak, self.live + int(nbytes))

    def revive(self, i: int) -> None:
        """Allocate tensor ``i`` again (a recomputation)."""
        t = self.tensors[i]
        t.refs, t.host_refs, t.on_host, t.device = 1, 0, False, True
        self._add(t.nbytes)

    def drop(self, i: int) -> None:
        t = self.tensors[i]
        t.refs -= 1
        self._maybe_free(t)

    def _maybe_free(self, t: _Tensor) -> None:
        # A host copy (host_refs) does not hold the device memory.
        if t.refs == 0 and t.device:
            t.device = False
            self.live -= t.nbytes

    # -- forward ---------------------------------------------------------------------------
    def op(
        self,
        inputs: Sequence[int],
        out_bytes: int,
        saves: Sequence[int] = (),
        *,
        save_out: bool = False,
        inplace: bool = False,
        cat: bool = False,
        extra: int = 0,
        params: int = 0,
    ) -> int:
        """Run a layer: allocate its output (none when ``inplace``), save ``saves`` (the
        output too with ``save_out``, and ``extra`` new bytes such as pool indices)."""
        out = inputs[0] if inplace else self.new(out_bytes)
        saves = list(saves) + ([out] if save_out else [])
        op = _Op(list(inputs), out, saves, inplace=inplace, cat=cat, region=self.region,
                 skip_level=self.skip_level, params=params)  # fmt: skip
        self.params += params
        if extra:
            op.extra = self.new(extra, grad=False)
            op.saves.append(op.extra)
        self.ops.append(op)
        self.events.append(("op", op))
        if self.region is None:  # inside a checkpointed block nothing is saved
            self._save_all(op)
        if extra and self.region is None:
            # Inside a checkpointed block the halo slabs stay on its tape until backward.
            self.drop(op.extra)
        return out

    def _save_all(self, op: _Op) -> None:
        for i in dict.fromkeys(op.saves):
            t = self.tensors[i]
            op.saved.append(i)
            if not t.on_host and t.host_refs == 0 and self._swaps(t, op):
                t.on_host = True
                self.swapped += t.nbytes
            if t.on_host:
                t.host_refs += 1
            else:
                if t.refs == 1:
                    self.kept_saved += t.nbytes
                t.refs += 1

    def _swaps(self, t: _Tensor, op: _Op) -> bool:
        s = self.spec
        if s.swap == "none" or t.nbytes < SWAP_FLOOR:
            return False
        if s.swap == "all":
            return True
        if s.swap == "skips":
            return op.skip_level
        if s.swap == "min_bytes":
            return t.nbytes >= s.swap_min_bytes
        return self.kept_saved + t.nbytes > s.swap_budget  # budget

    def release(self, i: int) -> None:
        """Python lets go of tensor ``i``."""
        self.drop(i)
        self.events.append(("drop", i))

    @contextmanager
    def in_region(self, region: int | None) -> Iterator[None]:
        outer, self.region = self.region, region
        try:
            yield
        finally:
            self.region = outer


def step_memory(spec: StepSpec) -> MemoryBreakdown:
    """Predicted peak device bytes of one training step of ``spec``."""
    _check(spec)
    sim = _Sim(spec)
    n, e = spec.batch, spec.dtype_bytes
    vox = [math.prod(b // 2**lvl for b in spec.block) for lvl in range(spec.depth + 1)]
    image = sim.new(n * spec.in_channels * vox[0] * 4, grad=False)
    sim.new(n * vox[0] * 8, grad=False)  # labels (int64)
    if spec.loss == "dice_ce":
        sim.new(n * vox[0], grad=False)  # valid mask (bool)
    batch = sim.live
    logits = _unet_forward(sim, spec, image, vox, e)
    grads = _loss(sim, spec, logits, vox[0])
    _backward(sim, spec, grads)
    p_bytes = sim.params * spec.param_bytes
    if spec.grid is not None and math.prod(spec.grid) > 1:
        sim.spike(p_bytes)  # the flat buffer all-reduced by the gradient sum
    # AdamW's step (foreach) holds temporaries of about 0.63x the parameters (measured).
    sim.spike(0.65 * p_bytes)
    buckets = p_bytes if spec.data > 1 else 0  # DDP's gradient buckets
    optimizer = spec.optimizer_states * p_bytes
    return MemoryBreakdown(
        peak=p_bytes + buckets + optimizer + sim.peak,
        parameters=p_bytes,
        gradients=p_bytes + buckets,
        optimizer=optimizer,
        batch=batch,
        activations=sim.peak - batch,
        halos=sim.halo,
        swapped=sim.swapped,
    )


def _check(spec: StepSpec) -> None:
    if len(spec.image) != spec.spatial_dims:
        raise ConfigError(
            f"image {spec.image} has {len(spec.image)} dims but spatial_dims={spec.spatial_dims}"
        )
    if spec.grid is not None and len(spec.grid) != spec.spatial_dims:
        raise ConfigError(f"grid {spec.grid} needs one extent per spatial dim of {spec.image}")
    if spec.loss not in ("dice_ce", "ce"):
        raise ConfigError(f"loss={spec.loss!r} is not one of dice_ce, ce")
    if spec.swap not in SWAP_POLICIES:
        raise ConfigError(f"swap={spec.swap!r} is not one of {', '.join(SWAP_POLICIES)}")


# ------------------------------------------------------------------------------ the U-Net


def _halo_bytes(spec: StepSpec, channels: int, level: int, e: int) -> int:
    """Bytes of the halo slabs a 3x3 convolution keeps on the rank with most neighbours."""
    if spec.grid is None or math.prod(spec.grid) == 1:
        return 0
    block = [b // 2**level for b in spec.block]
    sides = [min(2, g - 1) for g in spec.grid]
    grown = math.prod(b + s for b, s in zip(block, sides, strict=True))
    return spec.batch * channels * (grown - math.prod(block)) * e


def _block(sim: _Sim, spec: StepSpec, x: int, cin: int, cout: int, lvl: int, vox: list[int],
           e: int, *, owned: bool = False) -> int:  # fmt: skip
    """(conv, norm, ReLU in place) x convs_per_level; returns the block's output. The
    block's input stays referenced by the caller until the block returns, unless ``owned``
    (a temporary handed to the block, let go after its first layer)."""
    size = spec.batch * cout * vox[lvl] * e
    k = 3**spec.spatial_dims
    bias = cout if spec.norm == "none" else 0
    region = len(sim.ops) if spec.checkpoint else None
    if region is not None:  # the checkpoint saves the block's input (through the hooks)
        sim.op([x], 0, [x])
    with sim.in_region(region):
        a = x
        for i in range(spec.convs_per_level):
            halo = _halo_bytes(spec, cin if i == 0 else cout, lvl, e)
            sim.halo = max(sim.halo, halo)
            c_in = cin if i == 0 else cout
            conv = sim.op([a], size, [a], extra=halo, params=c_in * cout * k + bias)
            if i > 0 or owned:
                sim.release(a)
            a = conv
            if spec.norm != "none":
                a = sim.op([conv], size, [conv], params=2 * cout)
                sim.release(conv)
            sim.op([a], 0, [a], inplace=True)  # ReLU saves its result
    return a


def _unet_forward(sim: _Sim, spec: StepSpec, image: int, vox: list[int], e: int) -> int:
    ch, n = spec.channels, spec.batch
    x, cin, skips = image, spec.in_channels, []
    for lvl in range(spec.depth):
        sim.skip_level = True
        y = _block(sim, spec, x, cin, ch[lvl], lvl, vox, e)
        if x != image:
            sim.release(x)
        skips.append(y)
        # Max-pool: saves its input and int64 indices of its output's size.
        out = n * ch[lvl] * vox[lvl + 1]
        x = sim.op([y], out * e, [y], extra=out * 8)
        sim.skip_level = False
        cin = ch[lvl]
    y = _block(sim, spec, x, cin, ch[-1], spec.depth, vox, e)
    sim.release(x)
    x, skip = y, None
    for lvl in range(spec.depth - 1, -1, -1):
        if spec.upsampling == "transposed":
            up = sim.op([x], n * ch[lvl] * vox[lvl] * e, [x],
                        params=ch[lvl + 1] * ch[lvl] * 2**spec.spatial_dims + ch[lvl])  # fmt: skip
        else:  # Upsample (saves nothing) then a 1x1 conv (saves the upsampled tensor)
            big = sim.op([x], n * ch[lvl + 1] * vox[lvl] * e)
            up = sim.op([big], n * ch[lvl] * vox[lvl] * e, [big],
                        params=ch[lvl + 1] * ch[lvl] + ch[lvl])  # fmt: skip
            sim.release(big)
        sim.release(x)
        if skip is not None:
            sim.release(skip)
        skip = skips.pop()
        cat = sim.op([skip, up], 2 * n * ch[lvl] * vox[lvl] * e, cat=True)
        x = _block(sim, spec, cat, 2 * ch[lvl], ch[lvl], lvl, vox, e, owned=True)
        sim.release(up)
    logits = sim.op([x], n * spec.classes * vox[0] * e, [x],
                    params=ch[0] * spec.classes + spec.classes)  # fmt: skip
    sim.release(x)
    sim.release(skip)
    return logits


def _loss(sim: _Sim, spec: StepSpec, logits: int, v: int) -> dict[int, int]:
    """The trainer's cross-entropy + Dice forward; returns the gradient of the logits once
    the losses' backward has run (the loss's saved tensors are freed by then)."""
    n, k = spec.batch, spec.classes
    plane = n * k * v * 4
    if spec.loss == "ce":  # log-softmax kept; the labels are the batch's own
        kept = sim.new(plane, grad=False)
        sim.release(logits)
        g = sim.new(plane)
        sim.spike(plane)
        sim.drop(kept)
        return {logits: g}
    # Kept for backward: log-softmax, softmax, masked probabilities and masked one-hot
    # (fp32), and the int64 labels with padding marked; the int64 one-hot and a second
    # masked copy of the labels come and go.
    kept = sim.new(4 * plane + n * v * 8, grad=False)
    sim.spike(2 * plane + 3 * plane + n * v * 8)
    sim.release(logits)  # nobody saved the logits
    g = sim.new(plane)
    sim.spike(2 * plane)
    sim.drop(kept)
    return {logits: g}


def _backward(sim: _Sim, spec: StepSpec, grads: dict[int, int]) -> None:
    ops, i = sim.ops, len(sim.ops) - 1
    while i >= 0:
        region = ops[i].region
        if region is None:
            _prefetch(sim, ops, i, spec.prefetch)
            _op_backward(sim, ops[i], grads)
            i -= 1
            continue
        start = i
        while start > 0 and ops[start - 1].region == region:
            start -= 1
        _recompute(sim, ops[start : i + 1])
        for j in range(i, start - 1, -1):
            _op_backward(sim, ops[j], grads)
        i = start - 1


def _recompute(sim: _Sim, region: list[_Op]) -> None:
    """Replay a checkpointed block's forward, saving this time: its tensors are new ones."""
    first = next(k for k, (_, o) in enumerate(sim.events) if o is region[0])
    last = next(k for k, (_, o) in enumerate(sim.events) if o is region[-1])
    fresh: dict[int, int] = {}
    for kind, item in sim.events[first : last + 1]:
        if kind == "drop":
            if item in fresh:  # the replay does not take the caller's references again
                sim.drop(fresh[item])
            continue
        if not item.inplace:
            fresh[item.out] = sim.new(sim.tensors[item.out].nbytes, grad=sim.tensors[item.out].grad)
        # Halo slabs come from the tape, as they are: nothing new is allocated for them.
        for s in dict.fromkeys(item.saves):
            t = sim.tensors[fresh.get(s, s)]
            if t.on_host:  # the block's input, swapped: its device copy serves the region
                _to_device(sim, fresh.get(s, s))
                t.host_refs += 1
            else:
                t.refs += 1
            item.saved.append(fresh.get(s, s))
    sim.drop(fresh[region[-1].out])  # the recomputed output itself is not used


def _op_backward(sim: _Sim, op: _Op, grads: dict[int, int]) -> None:
    g = grads.pop(op.out, None)
    if g is not None and op.params:
        # The layer's parameter gradients, kept to the optimizer step; under a spatial grid
        # autograd keeps zeros while the hooks hold the local gradient for the final sum.
        spec = sim.spec
        copies = 2 if spec.grid is not None and math.prod(spec.grid) > 1 else 1
        sim.new(copies * op.params * spec.param_bytes, grad=False)
    if g is not None:
        if op.cat:  # each input's gradient is a view of the output's gradient
            for i in op.inputs:
                sim.tensors[g].refs += 1
                _accumulate(sim, grads, i, g)
            sim.drop(g)
        else:
            for i in dict.fromkeys(op.inputs):
                if sim.tensors[i].grad:
                    _accumulate(sim, grads, i, sim.new(sim.tensors[i].nbytes))
            sim.drop(g)
    _unsave(sim, op)


def _accumulate(sim: _Sim, grads: dict[int, int], i: int, g: int) -> None:
    if i in grads:  # autograd adds into the new gradient (it owns it) and frees the old one
        sim.drop(grads[i])
    grads[i] = g


def _prefetch(sim: _Sim, ops: list[_Op], j: int, depth: int) -> None:
    """Host tensors of op ``j`` come back to the device, and the next ``depth`` distinct host
    tensors saved before them (backward asks in roughly reverse order of saving)."""
    seen = set(ops[j].saved)
    for s in ops[j].saved:
        _to_device(sim, s)
    found = 0
    for k in range(j - 1, -1, -1):
        for s in reversed(ops[k].saved):
            if found >= depth:
                return
            if s in seen or not sim.tensors[s].on_host:
                continue
            seen.add(s)
            found += 1
            _to_device(sim, s)


def _to_device(sim: _Sim, s: int) -> None:
    t = sim.tensors[s]
    if t.on_host and not t.device:
        t.device = True
        sim._add(t.nbytes)


def _unsave(sim: _Sim, op: _Op) -> None:
    for s in op.saved:
        t = sim.tensors[s]
        if t.on_host:
            t.host_refs -= 1
            if t.host_refs == 0 and t.refs == 0 and t.device:
                t.device = False
                sim.live -= t.nbytes
        else:
            sim.drop(s)
    op.saved = []
