"""The geometry of functional calls, from their arguments: ``call_geometry`` gives the
``Geometry`` of an ``F.*`` call made inside a forward (convolution, pooling, interpolation,
padding), None for a call that does not touch space, or raises ``Unsupported`` naming a call
whose geometry cannot be known (grid sampling, rolls, functional normalisation, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from haloseg.geometry import ops
from haloseg.geometry.ops import Geometry, Unsupported

__all__ = ["DIM_FUNCS", "call_geometry", "interpolate_args", "pad_args"]

CallFn = Callable[[tuple, dict, int], Geometry]
_CALLS: dict[Any, CallFn] = {}
_REFUSED: dict[Any, str] = {}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _conv_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    w = _arg(args, kwargs, 1, "weight")
    return ops.conv(
        n, tuple(w.shape[2:]), _arg(args, kwargs, 3, "stride", 1),
        _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1),
    )  # fmt: skip


def _conv_t_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    w = _arg(args, kwargs, 1, "weight")
    return ops.conv_transpose(
        n, tuple(w.shape[2:]), _arg(args, kwargs, 3, "stride", 1),
        _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "output_padding", 0),
        _arg(args, kwargs, 7, "dilation", 1),
    )  # fmt: skip


def _max_pool_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    if _arg(args, kwargs, 6, "return_indices", False):
        raise Unsupported("return_indices=True gives block-local indices; use False")
    return ops.pool(n, _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride"),
                    _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                    _arg(args, kwargs, 5, "ceil_mode", False), is_max=True)  # fmt: skip


def _avg_pool_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    return ops.pool(n, _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride"),
                    _arg(args, kwargs, 3, "padding", 0), 1,
                    _arg(args, kwargs, 4, "ceil_mode", False), is_max=False)  # fmt: skip


def interpolate_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``F.interpolate``'s arguments by name."""
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
             "antialias")  # fmt: skip
    defaults = (None, None, "nearest", None, None, False)
    return {k: _arg(args, kwargs, i + 1, k, d) for i, (k, d) in enumerate(zip(names, defaults))}


def _interpolate_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    a = interpolate_args(args, kwargs)
    if a["antialias"]:
        raise Unsupported("antialias=True is not supported")
    return ops.interpolate(n, a["size"], a["scale_factor"], a["mode"], a["align_corners"],
                           a["recompute_scale_factor"])  # fmt: skip


def pad_args(args: tuple, kwargs: dict) -> tuple[list[int], str, float | None]:
    """``F.pad``'s widths, mode and value."""
    return (list(_arg(args, kwargs, 1, "pad")), _arg(args, kwargs, 2, "mode", "constant"),
            _arg(args, kwargs, 3, "value", None))  # fmt: skip


def _pad_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    return ops.pad(n, *pad_args(args, kwargs))


def _adaptive_call(args: tuple, kwargs: dict, n: int) -> Geometry:
    raise Unsupported("adaptive pooling reads the whole image; use nn.AdaptiveAvgPool2d(1) "
                      "(partitioned as a global pooling)")  # fmt: skip


for _f in (F.conv1d, F.conv2d, F.conv3d):
    _CALLS[_f] = _conv_call
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    _CALLS[_f] = _conv_t_call
for _f in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
    _CALLS[_f] = _max_pool_call
for _f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
    _CALLS[_f] = _avg_pool_call
for _f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
           F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):  # fmt: skip
    _CALLS[_f] = _adaptive_call
_CALLS[F.interpolate] = _CALLS[F.upsample] = _interpolate_call
_CALLS[F.pad] = _pad_call

_NORM_HINT = "; use the nn.Module form (nn.GroupNorm, nn.InstanceNorm2d, ...)"
_REFUSED.update({
    F.batch_norm: "F.batch_norm normalises with statistics over the image" + _NORM_HINT,
    F.instance_norm: "F.instance_norm normalises with statistics over the image" + _NORM_HINT,
    F.group_norm: "F.group_norm normalises with statistics over the image" + _NORM_HINT,
    F.layer_norm: "F.layer_norm normalises over the trailing (spatial) axes",
    F.local_response_norm: "F.local_response_norm is not supported",
    F.lp_pool1d: "F.lp_pool1d is not supported", F.lp_pool2d: "F.lp_pool2d is not supported",
    F.grid_sample: "F.grid_sample reads data-dependent positions",
    F.fold: "F.fold is not supported", F.unfold: "F.unfold is not supported",
    F.pixel_shuffle: "F.pixel_shuffle is not supported",
    F.pixel_unshuffle: "F.pixel_unshuffle is not supported",
    torch.roll: "torch.roll wraps around the image", torch.Tensor.roll: "roll wraps around",
    torch.flip: "torch.flip mirrors the image", torch.Tensor.flip: "flip mirrors the image",
})  # fmt: skip

DIM_FUNCS = {
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
    torch.Tensor.log_softmax, torch.cumsum, torch.Tensor.cumsum, torch.cumprod,
    torch.Tensor.cumprod, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
}  # fmt: skip
"""Functions along one ``dim``: pointwise when it is not spatial."""


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def call_geometry(func: Any, args: tuple, kwargs: dict, spatial_dims: int) -> Geometry | None:
    """The geometry of a functional call on an ``(N, C, *spatial)`` tensor, or None when
    the call is not a spatial operation (it is judged by its output's shape instead).

    Raises ``Unsupported`` naming the call for one whose geometry cannot be known.
    """
    if func in _REFUSED:
        raise Unsupported(_REFUSED[func])
    if func in DIM_FUNCS:
        t, dim = (args[0] if args else None), _arg(args, kwargs, 1, "dim")
        if isinstance(t, torch.Tensor) and isinstance(dim, int) and t.dim() == spatial_dims + 2:
            if dim % t.dim() >= 2:
                raise Unsupported(f"{_name(func)}(dim={dim}) runs along a spatial dimension")
        return None
    rule = _CALLS.get(func)
    if rule is None:
        return None
    try:
        return rule(args, kwargs, spatial_dims)
    except Unsupported as e:
        raise Unsupported(f"{_name(func)}: {e}") from None
