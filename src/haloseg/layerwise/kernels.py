"""One block of a local layer, computed from its input window.

The window (``haloseg.layerwise.window``) already holds the layer's padding, so every
layer runs unpadded here: convolutions and pooling give exactly the block, a transposed
convolution gives a little more and is cropped, interpolation gathers the source voxels and
weights of the registry's own per-output tables, padding and cropping are the window itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import Box, TransposedConvAxis
from haloseg.geometry.ops import InterpAxis, tuple_of
from haloseg.layerwise.graph import Step
from haloseg.layerwise.window import node_block

__all__ = [
    "check_local",
    "computed_voxels",
    "execution",
    "local_block",
    "step_block",
    "window_of",
]

Kernel = Callable[[Step, torch.Tensor, Box, Box], torch.Tensor]

_CALLS: dict[Any, str] = {F.interpolate: "upsample", F.pad: "pad"}
for _n in (1, 2, 3):
    _CALLS[getattr(F, f"conv{_n}d")] = "conv"
    _CALLS[getattr(F, f"conv_transpose{_n}d")] = "conv_transpose"
    _CALLS[getattr(F, f"max_pool{_n}d")] = "max_pool"


def execution(step: Step) -> str | None:
    """The kernel that computes ``step``'s blocks."""
    if step.module is None:
        return _CALLS.get(step.node.target)
    if step.execution == "pool":
        is_max = isinstance(step.module, torch.nn.modules.pooling._MaxPoolNd)
        return "max_pool" if is_max else "avg_pool"
    return step.execution


def step_block(step: Step, block: Sequence[int], image: Sequence[int]) -> list[int]:
    """The block of ``step``'s output for ``block`` voxels of the ``image``: the same region at
    the node's resolution."""
    sizes = node_block(block, image, step.shape[2:])
    if step.kind != "local":
        return sizes
    # Up-sampling by a stride s: blocks starting at multiples of s compute no voxel twice.
    strides = [r.stride if isinstance(r, TransposedConvAxis) else 1 for r in step.rules]
    return [min(-(-b // s) * s, n) for b, s, n in zip(sizes, strides, step.shape[2:])]


def window_of(step: Step, box: Box) -> Box:
    """The input window ``step`` reads for its output block ``box``."""
    return tuple(r.in_window(a, b) for r, (a, b) in zip(step.rules, box, strict=True))


def _params(step: Step, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Weights and arguments of a convolution or pooling, from its module or its call."""
    m = step.module
    if m is not None:
        return {k: getattr(m, k, d) for k, d in (("weight", None), ("bias", None),
                ("stride", 1), ("dilation", 1), ("groups", 1), ("kernel_size", 1),
                ("divisor_override", None), ("ceil_mode", False))}  # fmt: skip
    names = {"conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
             "conv_transpose": ("input", "weight", "bias", "stride", "padding",
                                "output_padding", "groups", "dilation"),
             "max_pool": ("input", "kernel_size", "stride", "padding", "dilation")}  # fmt: skip
    kind = execution(step)
    out = {k: v for k, v in zip(names.get(kind, ()), args, strict=False)}
    out.update(kwargs)
    defaults = {"bias": None, "stride": 1, "dilation": 1, "groups": 1}
    if kind == "max_pool":
        defaults["stride"] = out.get("kernel_size")
    return {**defaults, **{k: v for k, v in out.items() if v is not None or k == "bias"}}


# oneDNN compiles a kernel for every new shape (milliseconds): worth it for windows of at
# least this many voxels, which repeat over the blocks of a node.
_ONEDNN_VOXELS = 512


def _onednn(x: torch.Tensor, transposed: bool) -> bool:
    """Whether to call oneDNN's convolution directly: PyTorch picks it on the CPU only for
    inputs whose N*C*D*H exceeds 20480 (with N = 1 and 3x3 kernels), so a block's window
    would otherwise take the native kernel, 1.3-3x slower per voxel than the whole image's
    (and its backward up to 10x)."""
    return (x.device.type == "cpu" and not transposed and x.dtype == torch.float32
            and x[0, 0].numel() >= _ONEDNN_VOXELS and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)  # fmt: skip


class _OneDnnConv(torch.autograd.Function):
    """A stride-1, ungrouped convolution of an unpadded window whose backward is two oneDNN
    convolutions too: the input's gradient is the output gradient, padded by the kernel's
    reach, convolved with the flipped and transposed kernel; the kernel's gradient is the
    input convolved with the output gradient as kernel, samples summed as channels
    (``stride`` = the dilation)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                dilation: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, w)
        ctx.dilation = dilation
        n = x.dim() - 2
        return torch.mkldnn_convolution(x, w, b, [0] * n, [1] * n, dilation, 1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        d, n = ctx.dilation, x.dim() - 2
        g = g.contiguous()
        zeros, ones = [0] * n, [1] * n
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            reach = [di * (k - 1) for di, k in zip(d, w.shape[2:], strict=True)]
            pads = [p for r in reversed(reach) for p in (r, r)]
            flipped = w.flip(list(range(2, n + 2))).transpose(0, 1).contiguous()
            gx = torch.mkldnn_convolution(F.pad(g, pads), flipped, None, zeros, ones, d, 1)
        if ctx.needs_input_grad[1]:
            gw = torch.mkldnn_convolution(x.transpose(0, 1).contiguous(),
                                          g.transpose(0, 1).contiguous(), None, zeros, d,
                                          ones, 1).transpose(0, 1)  # fmt: skip
        if ctx.needs_input_grad[2]:
            gb = g.sum(dim=[0, *range(2, n + 2)])
        return gx, gw, gb, None


def _conv(step: Step, x: torch.Tensor, p: dict, n: int, transposed: bool) -> torch.Tensor:
    zeros = [0] * n
    stride, dilation = tuple_of(p["stride"], n), tuple_of(p["dilation"], n)
    if _onednn(x, transposed):
        x, w = x.contiguous(), p["weight"].contiguous()
        if all(s == 1 for s in stride) and p["groups"] == 1:
            return _OneDnnConv.apply(x, w, p["bias"], dilation)
        return torch.mkldnn_convolution(x, w, p["bias"], zeros, stride, dilation, p["groups"])
    return torch.convolution(x, p["weight"], p["bias"], stride, zeros, dilation, transposed,
                             zeros, p["groups"])  # fmt: skip


def _crop_transposed(step: Step, y: torch.Tensor, box: Box, window: Box) -> torch.Tensor:
    index: list[slice] = [slice(None), slice(None)]
    for rule, (a, b), (lo, _) in zip(step.rules, box, window, strict=True):
        assert isinstance(rule, TransposedConvAxis)
        origin = lo * rule.stride - rule.padding  # global index of the window's first output
        index.append(slice(a - origin, b - origin))
    return y[tuple(index)]


def _interpolate(step: Step, x: torch.Tensor, box: Box, window: Box) -> torch.Tensor:
    for d, (rule, (a, b), (lo, _)) in enumerate(zip(step.rules, box, window, strict=True)):
        assert isinstance(rule, InterpAxis)
        dim = 2 + d
        first = torch.tensor(rule.lo[a:b], device=x.device) - lo
        x0 = x.index_select(dim, first)
        if rule.weight is None:
            x = x0
            continue
        last = torch.tensor(rule.hi[a:b], device=x.device) - 1 - lo
        shape = [1] * x.dim()
        shape[dim] = b - a
        lam = rule.weight[a:b].to(x.dtype).to(x.device).view(shape)
        x = x0 * (1 - lam) + x.index_select(dim, last) * lam
    return x


def _pool(step: Step, x: torch.Tensor, p: dict, n: int, is_max: bool) -> torch.Tensor:
    k = tuple_of(p["kernel_size"], n)
    s = tuple_of(p["stride"], n)
    if is_max:
        pool = getattr(F, f"max_pool{n}d")
        return pool(x, k, s, 0, tuple_of(p["dilation"], n))
    pool = getattr(F, f"avg_pool{n}d")
    return pool(x, k, s, 0, False, True, p["divisor_override"])


def check_local(step: Step) -> None:
    """Refuse, naming the layer, a local step no kernel here computes exactly."""
    kind = execution(step)
    where = f"'{step.node.target}'" if step.module is not None else step.node.name
    if kind not in ("conv", "conv_transpose", "max_pool", "avg_pool", "upsample", "pad"):
        raise UnsupportedLayerError(f"{where}: has no layer-wise execution")
    m = step.module
    if kind == "avg_pool" and m is not None:
        pads = tuple_of(m.padding, len(step.rules))
        if m.ceil_mode or (any(pads) and not m.count_include_pad):
            raise UnsupportedLayerError(
                f"{where}: average pooling with ceil_mode=True or count_include_pad=False "
                "divides by a count that depends on the border; use ceil_mode=False and "
                "count_include_pad=True"
            )


def local_block(
    step: Step, x: torch.Tensor, box: Box, window: Box, args: tuple = (),
    kwargs: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """The output block ``box`` of the local ``step`` from its input ``window`` ``x``.

    ``args``/``kwargs``: a functional call's arguments with the image replaced by ``x``."""
    kind = execution(step)
    n = x.dim() - 2
    if kind == "pad":
        return x
    if kind == "upsample":
        return _interpolate(step, x, box, window)
    p = _params(step, args, kwargs or {})
    if kind == "conv":
        return _conv(step, x, p, n, transposed=False)
    if kind == "conv_transpose":
        return _crop_transposed(step, _conv(step, x, p, n, transposed=True), box, window)
    return _pool(step, x, p, n, is_max=kind == "max_pool")


def computed_voxels(step: Step, box: Box, window: Box) -> int:
    """Output voxels the kernel computes for ``box`` (a transposed convolution's whole window)."""
    if execution(step) != "conv_transpose":
        return _volume(box)
    sizes: Sequence[int] = [
        (hi - lo - 1) * r.stride + r.dilation * (r.kernel - 1) + 1  # type: ignore[attr-defined]
        for r, (lo, hi) in zip(step.rules, window, strict=True)
    ]
    return _volume(tuple((0, s) for s in sizes))


def _volume(box: Box) -> int:
    v = 1
    for a, b in box:
        v *= b - a
    return v
