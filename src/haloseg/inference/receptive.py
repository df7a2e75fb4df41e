"""Receptive field of a network: how far each output reaches into its input, per side.

The network runs once on the meta device (no memory, no arithmetic) while every operation is
recorded: layers with a geometry rule (convolutions, transposed convolutions, pooling,
up-sampling, crops) as nodes with their per-axis rules, every other tensor function as a
pointwise node (it keeps the spatial shape). Walking the record backwards from one output
voxel propagates the input window it needs (interval hulls through skips and concatenations).
The largest reach over one alignment period of output positions is the dependency radius.
Anything whose outputs depend on the whole image (statistics over it, global pooling) or on
far-away voxels (circular padding) is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import (
    AxisRule,
    Geometry,
    Unsupported,
    call_geometry,
    layer_entry,
    layer_geometry,
)
from haloseg.parallel.alignment import downsampling_factor

__all__ = ["ReceptiveField", "receptive_field"]


@dataclass(frozen=True)
class ReceptiveField:
    """Per spatial dim, how many input voxels before and after an output voxel it depends
    on (``radius``), and the alignment tile origins need (product of strides)."""

    radius: tuple[tuple[int, int], ...]
    alignment: int

    @property
    def halo(self) -> tuple[int, ...]:
        """Context per side to give a tile: the radius rounded up to the alignment."""
        a = self.alignment
        return tuple(-(-max(lo, hi) // a) * a for lo, hi in self.radius)


_NORM_HINT = (
    "; tiles would see other statistics than the whole image. Run it on whole images: "
    "haloseg infer does so by itself (one process when the image fits --max-memory, or "
    "torchrun --nproc-per-node N -m haloseg infer ... --grid ...), and from Python "
    "haloseg.spatial_parallel"
)


def _checked(geometry: Geometry) -> Geometry:
    """``geometry``, or the reason tiles cannot reproduce it."""
    if geometry.kind == "global":
        raise Unsupported(geometry.reason + _NORM_HINT)
    if geometry.periodic:
        raise Unsupported("circular padding wraps around the whole image")
    return geometry


@dataclass
class _Node:
    rules: list[AxisRule] | None  # None: pointwise
    inputs: list[int]
    outputs: list[int]


class _Recorder(TorchFunctionMode):
    """Records every tensor function outside ruled layers as a pointwise node."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.n = spatial_dims
        self.nodes: list[_Node] = []
        self.keep: list[torch.Tensor] = []  # ids stay unique while the record lives
        self.inside = 0
        self.stack: list[str] = []
        self.images: set[int] = set()

    def ids(self, tree: Any, *, images_only: bool = False) -> list[int]:
        """Ids of the image-shaped tensors in ``tree`` (kept alive, so ids stay unique);
        with ``images_only``, of those computed from the input (not from weights alone)."""
        leaves, _ = tree_flatten(tree)
        out = []
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.dim() >= self.n + 2:
                if images_only and id(t) not in self.images:
                    continue
                self.keep.append(t)
                out.append(id(t))
        return out

    def shapes(self, tree: Any, ids: list[int]) -> set[tuple[int, ...]]:
        leaves, _ = tree_flatten(tree)
        return {tuple(t.shape[-self.n :]) for t in leaves
                if isinstance(t, torch.Tensor) and id(t) in ids}  # fmt: skip

    def refuse(self, reason: str) -> None:
        where = self.stack[-1] if self.stack else "<root>"
        raise UnsupportedLayerError(f"'{where}': {reason}")

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        geometry = None
        try:
            geometry = call_geometry(func, args, kwargs, self.n)
            if geometry is not None:
                geometry = _checked(geometry)
        except Unsupported as e:
            self.refuse(f"{e}")
        out = func(*args, **kwargs)
        ins = self.ids((args, kwargs), images_only=True)
        if not ins:  # weights and constants: not part of the image's dependency graph
            return out
        outs = self.ids(out)
        self.images.update(outs)
        if not outs:
            if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
                self.refuse(f"{_fname(func)} turns the image into a tensor of another rank")
            return out
        if geometry is not None and geometry.kind == "local":
            x = args[0] if args else kwargs["input"]
            self.nodes.append(_Node(geometry.axis_rules(list(x.shape[2:])), ins[:1], outs))
            return out
        shapes = self.shapes((args, kwargs), ins)
        try:
            expect = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expect = None
        if expect is None or self.shapes(out, outs) != {expect}:
            self.refuse(
                f"{_fname(func)} changes the spatial shape ({sorted(shapes)}); only "
                "operations with geometry rules may (convolution, pooling, interpolation, "
                "padding)"
            )
        self.nodes.append(_Node(None, ins, outs))
        return out


def _fname(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _leaf_geometry(m: nn.Module, n: int) -> Geometry | None:
    """The geometry a module is recorded by as one node; None: its calls are recorded."""
    if layer_entry(m) is None and next(m.children(), None) is not None:
        return None
    geometry = _checked(layer_geometry(m, n))
    return None if geometry.kind == "composite" else geometry


def _hooks(model: nn.Module, rec: _Recorder) -> list[Any]:
    handles = []
    for name, m in model.named_modules():

        def pre(mod: nn.Module, args: Any, name: str = name) -> None:
            rec.stack.append(name or "<root>")
            mod._hs_rf_entered = None
            if rec.inside:
                return
            try:
                geometry = _leaf_geometry(mod, rec.n)
            except Unsupported as e:
                rec.refuse(str(e))
            if geometry is not None:
                rec.inside += 1
                mod._hs_rf_entered = geometry

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            rec.stack.pop()
            geometry, mod._hs_rf_entered = mod._hs_rf_entered, None
            if geometry is None:
                return
            rec.inside -= 1
            x = args[0]
            rules = geometry.axis_rules(list(x.shape[2:])) if geometry.kind == "local" else None
            outs = rec.ids(out)
            rec.images.update(outs)
            rec.nodes.append(_Node(rules, rec.ids(x), outs))

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _record(model: nn.Module, shape: Sequence[int], in_channels: int) -> tuple[_Recorder, int, int]:
    rec = _Recorder(len(shape))
    handles = _hooks(model, rec)
    meta = {
        k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()
    }
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.empty((1, in_channels, *shape), device="meta", dtype=dtype)
    try:
        with rec:
            rec.keep.append(x)
            rec.images.add(id(x))
            out = torch.func.functional_call(model, meta, (x,))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != tuple(shape):
        got = tuple(out.shape[2:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedLayerError(
            f"the network maps spatial shape {tuple(shape)} to {got}; tiled inference needs "
            "outputs the size of the input (same-padded networks)"
        )
    return rec, id(x), id(out)


def _window(rec: _Recorder, x_id: int, out_id: int, point: Sequence[int]) -> list[tuple[int, int]]:
    """Input window the output voxel ``point`` depends on."""
    need: dict[int, list[tuple[int, int]]] = {out_id: [(p, p + 1) for p in point]}
    for node in reversed(rec.nodes):
        wants = [need[o] for o in node.outputs if o in need]
        if not wants:
            continue
        box = [(min(w[d][0] for w in wants), max(w[d][1] for w in wants)) for d in range(rec.n)]
        if node.rules is not None:
            box = [r.in_window(a, b) for r, (a, b) in zip(node.rules, box, strict=True)]
        for i in node.inputs:
            old = need.get(i)
            need[i] = (
                box
                if old is None
                else [(min(a, c), max(b, e)) for (a, b), (c, e) in zip(old, box, strict=True)]
            )
    return need.get(x_id, [(p, p + 1) for p in point])


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise UnsupportedLayerError(
            "the network has no convolution to take its input channels from"
        )
    return first.in_channels


def receptive_field(model: nn.Module, spatial_dims: int) -> ReceptiveField:
    """The exact dependency radius per side and the tile alignment of ``model``.

    Raises ``UnsupportedLayerError`` naming the module for anything non-local.
    """
    align = downsampling_factor(model, spatial_dims)
    size = align * 16
    while True:
        rec, x_id, out_id = _record(model, [size] * spatial_dims, _in_channels(model))
        centre = size // 2 // align * align
        radius = [[0, 0] for _ in range(spatial_dims)]
        inside = True
        for offset in range(align):
            point = [centre + offset] * spatial_dims
            for d, (lo, hi) in enumerate(_window(rec, x_id, out_id, point)):
                radius[d][0] = max(radius[d][0], point[d] - lo)
                radius[d][1] = max(radius[d][1], hi - 1 - point[d])
                inside &= lo > 0 and hi < size
        # Interpolation tables are exact only away from the probe's own border.
        if inside or size >= align * 2**12:
            return ReceptiveField(tuple((lo, hi) for lo, hi in radius), align)
        size *= 4
