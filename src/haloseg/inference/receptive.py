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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import AxisRule, ConvAxis, IndexAxis, TransposedConvAxis, same_padding
from haloseg.models.unet import Crop
from haloseg.parallel.convert import downsampling_factor

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


_GLOBAL = {
    F.group_norm: "GroupNorm normalises with statistics over the whole image",
    F.layer_norm: "LayerNorm normalises with statistics over the whole image",
    F.adaptive_avg_pool1d: "adaptive pooling reads the whole image",
    F.adaptive_avg_pool2d: "adaptive pooling reads the whole image",
    F.adaptive_avg_pool3d: "adaptive pooling reads the whole image",
    F.adaptive_max_pool1d: "adaptive pooling reads the whole image",
    F.adaptive_max_pool2d: "adaptive pooling reads the whole image",
    F.adaptive_max_pool3d: "adaptive pooling reads the whole image",
}
_SPATIAL = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.interpolate, F.upsample, F.grid_sample, F.pad, F.fold, F.unfold, F.pixel_shuffle,
    F.pixel_unshuffle, torch.roll, torch.flip, torch.Tensor.roll, torch.Tensor.flip,
}  # fmt: skip
_NORM_HINT = (
    "; tiles would see other statistics than the whole image. Run it on whole images: "
    "haloseg infer does so by itself (one process when the image fits --max-memory, or "
    "torchrun --nproc-per-node N -m haloseg infer ... --grid ...), and from Python "
    "haloseg.spatial_parallel"
)


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv_rules(m: nn.modules.conv._ConvNd, n: int) -> list[AxisRule]:
    if m.padding_mode == "circular":
        raise ValueError("circular padding wraps around the whole image")
    k, s, d = _tuple(m.kernel_size, n), _tuple(m.stride, n), _tuple(m.dilation, n)
    if m.transposed:
        p, op = _tuple(m.padding, n), _tuple(m.output_padding, n)
        return [TransposedConvAxis(k[i], s[i], p[i], op[i], d[i]) for i in range(n)]
    if m.padding == "same":
        pads = [same_padding(k[i], d[i]) for i in range(n)]
    elif m.padding == "valid":
        pads = [(0, 0)] * n
    else:
        pads = [(p, p) for p in _tuple(m.padding, n)]
    return [ConvAxis(k[i], s[i], *pads[i], d[i]) for i in range(n)]


def _pool_rules(m: nn.Module, n: int) -> list[AxisRule]:
    k, p = _tuple(m.kernel_size, n), _tuple(m.padding, n)
    s = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
    d = _tuple(getattr(m, "dilation", 1), n)
    return [ConvAxis(k[i], s[i], p[i], p[i], d[i], m.ceil_mode) for i in range(n)]


def _upsample_rules(m: nn.Upsample, n: int, sizes: Sequence[int]) -> list[AxisRule]:
    from haloseg.parallel.layers import PartitionedUpsample  # its exact index tables

    tables = [PartitionedUpsample._table(m, sizes[i], i, n) for i in range(n)]  # type: ignore[arg-type]
    return [IndexAxis(t.lo, t.hi) for t in tables]


def _crop_rules(m: Crop, n: int) -> list[AxisRule]:
    return [ConvAxis(1, 1, -c, -c) for c in m.margins]


_RULES: list[tuple[type | tuple[type, ...], Callable[..., list[AxisRule]]]] = [
    (nn.modules.conv._ConvNd, lambda m, n, sizes: _conv_rules(m, n)),
    ((nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd),
     lambda m, n, sizes: _pool_rules(m, n)),
    (nn.Upsample, _upsample_rules),
    (Crop, lambda m, n, sizes: _crop_rules(m, n)),
]  # fmt: skip


def _rule_of(m: nn.Module) -> Callable[..., list[AxisRule]] | None:
    return next((r for cls, r in _RULES if isinstance(m, cls)), None)


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

    def ids(self, tree: Any) -> list[int]:
        leaves, _ = tree_flatten(tree)
        out = []
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.dim() >= self.n + 2:
                self.keep.append(t)
                out.append(id(t))
        return out

    def refuse(self, reason: str) -> None:
        where = self.stack[-1] if self.stack else "<root>"
        raise UnsupportedLayerError(f"'{where}': {reason}")

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        self._check(func, args, kwargs)
        out = func(*args, **kwargs)
        ins, outs = self.ids((args, kwargs)), self.ids(out)
        if ins and outs:
            spatial = {tuple(t.shape[-self.n :]) for t in self.keep[-len(ins) - len(outs) :]}
            if len(spatial) > 1:
                self.refuse(
                    f"{_fname(func)} changes the spatial shape ({sorted(spatial)}); only "
                    "layers with geometry rules may (convolution, pooling, up-sampling, Crop)"
                )
            self.nodes.append(_Node(None, ins, outs))
        return out

    def _check(self, func: Any, args: tuple, kwargs: dict) -> None:
        if func in _GLOBAL:
            self.refuse(_GLOBAL[func] + _NORM_HINT)
        if func is F.batch_norm and (kwargs.get("training") or _arg(args, 5, False)):
            self.refuse("BatchNorm in training mode normalises with batch statistics (call "
                        "model.eval())" + _NORM_HINT)  # fmt: skip
        if func is F.instance_norm and kwargs.get("use_input_stats", _arg(args, 5, True)):
            self.refuse("InstanceNorm normalises with statistics over the whole image" + _NORM_HINT)
        if func in _SPATIAL and not (func is F.pad and not any(_arg(args, 1, kwargs.get("pad")))):
            self.refuse(
                f"{_fname(func)} is a spatial operation called inside a forward; use the "
                "nn.Module form (nn.Conv2d, nn.Upsample, ...) so its geometry is known"
            )


def _arg(args: tuple, i: int, default: Any) -> Any:
    return args[i] if len(args) > i else default


def _fname(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _hooks(model: nn.Module, rec: _Recorder) -> list[Any]:
    handles = []
    for name, m in model.named_modules():
        rule = _rule_of(m)

        def pre(mod: nn.Module, args: Any, name: str = name, rule: Any = rule) -> None:
            rec.stack.append(name or "<root>")
            if rule is not None and not rec.inside:
                rec.inside += 1
                mod._hs_rf_entered = True
            else:
                mod._hs_rf_entered = False

        def post(mod: nn.Module, args: Any, out: Any, rule: Any = rule, name: str = name) -> None:
            rec.stack.pop()
            if not mod._hs_rf_entered:
                return
            x = args[0]
            try:
                rules = rule(mod, rec.n, list(x.shape[2:]))
            except ValueError as e:
                rec.stack.append(name or "<root>")
                rec.refuse(str(e))
            finally:
                rec.inside -= 1
            rec.nodes.append(_Node(rules, rec.ids(x), rec.ids(out)))

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
