"""Functional calls inside a converted model's forward: partitioned, or refused by name.

A ``TorchFunctionMode`` sees every tensor function the forward calls outside partitioned
layers. Calls with a static geometry in the registry (``F.conv*``, ``F.interpolate``,
``F.pad``, ``F.max_pool*``, ``F.avg_pool*``) run partitioned on a ``Site`` of their own, one
per module path and function; calls whose geometry cannot be known are refused naming the
module; anything else must keep the spatial shape (pointwise), or it is refused too.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import Geometry, Unsupported, call_geometry
from haloseg.geometry.calls import interpolate_args, pad_args
from haloseg.parallel.conv import conv_blocks, conv_transpose_blocks
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.pool import pool_blocks
from haloseg.parallel.resample import interpolate_blocks, pad_blocks
from haloseg.parallel.site import Site

__all__ = ["guarded", "post_hook", "pre_hook"]

_STATE = threading.local()


class _Images:
    """The tensors that are blocks of an image: the root input and everything computed from
    one. Weights and what is computed from them alone (a standardised kernel) are not."""

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref] = {}

    def __contains__(self, t: object) -> bool:
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t

    def add(self, tree: Any) -> None:
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                self.refs[id(t)] = weakref.ref(t)

    def any_in(self, tree: Any) -> bool:
        return any(t in self for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _images() -> _Images:
    if not hasattr(_STATE, "images"):
        _STATE.images = _Images()
    return _STATE.images


_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MAX = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_AVG = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return kwargs[name] if name in kwargs else args[i] if len(args) > i else default


class _FunctionalGuard(TorchFunctionMode):
    """Partition or refuse the spatial functional calls of a forward."""

    def __init__(self, dec: Decomposition) -> None:
        super().__init__()
        self.dec, self.n = dec, dec.spatial_dims
        self.sites: dict[tuple[str, str], Site] = getattr(dec, "_hs_call_sites", {})
        dec._hs_call_sites = self.sites

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(_STATE, "inside", 0):
            return func(*args, **kwargs)
        images = _images()
        if not images.any_in((args, kwargs)):  # weights, constants: not an image
            return func(*args, **kwargs)
        try:
            geometry = call_geometry(func, args, kwargs, self.n)
        except Unsupported as e:
            self._refuse(str(e))
        if geometry is not None and geometry.kind != "pointwise":
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or x.dim() != self.n + 2:
                got = x.dim() if isinstance(x, torch.Tensor) else type(x).__name__
                self._refuse(f"{_name(func)} on a tensor of rank {got} in a {self.n}-D network")
            _STATE.inside += 1
            try:
                out = self._partitioned(func, geometry, x, args, kwargs)
            finally:
                _STATE.inside -= 1
            images.add(out)
            return out
        out = func(*args, **kwargs)
        if geometry is None:
            self._check_shape(func, args, out)
        images.add(out)
        return out

    def _partitioned(
        self, func: Any, geometry: Geometry, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        site = self._site(func)
        if func in _CONV:
            return conv_blocks(site, x, _arg(args, kwargs, 1, "weight"),
                               _arg(args, kwargs, 2, "bias"), geometry,
                               _arg(args, kwargs, 6, "groups", 1))  # fmt: skip
        if func in _CONV_T:
            return conv_transpose_blocks(site, x, _arg(args, kwargs, 1, "weight"),
                                         _arg(args, kwargs, 2, "bias"), geometry,
                                         _arg(args, kwargs, 6, "groups", 1))  # fmt: skip
        if func in _MAX:
            return pool_blocks(site, x, geometry, is_max=True)
        if func in _AVG:
            include = _arg(args, kwargs, 5, "count_include_pad", True)
            divisor = _arg(args, kwargs, 6, "divisor_override")
            return pool_blocks(site, x, geometry, is_max=False, count_include_pad=include,
                               divisor_override=divisor)  # fmt: skip
        if func is F.pad:
            widths, _, value = pad_args(args, kwargs)
            return pad_blocks(site, x, geometry, widths, value)
        if func not in (F.interpolate, F.upsample):
            raise UnsupportedLayerError(f"'{site.path}': {_name(func)} has a geometry but no "
                                        "partitioned execution")  # fmt: skip
        options = interpolate_args(args, kwargs)
        if options["size"] is not None:
            mode = {"mode": options["mode"], "align_corners": options["align_corners"]}
            return interpolate_blocks(site, x, local_size=options["size"], options=mode)
        return interpolate_blocks(site, x, geometry)

    def _site(self, func: Any) -> Site:
        stack = getattr(_STATE, "stack", [])
        key = (stack[-1] if stack else "<root>", _name(func))
        if key not in self.sites:
            self.sites[key] = Site(self.dec, f"{key[0]}:{key[1]}", key[1])
        return self.sites[key]

    def _check_shape(self, func: Any, args: tuple, out: Any) -> None:
        """A call that is not a spatial operation must be pointwise: its output has the
        (broadcast) spatial shape of its inputs. A replicated ``(N, C, 1, 1)`` tensor, as
        global pooling gives, broadcasts against blocks exactly."""
        if not (isinstance(out, torch.Tensor) and args):
            return
        n = self.n
        leaves = args[0] if isinstance(args[0], (list, tuple)) else args
        shapes = [tuple(t.shape[-n:]) for t in leaves
                  if isinstance(t, torch.Tensor) and t.dim() == n + 2]  # fmt: skip
        if not shapes:
            return
        try:
            expect = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expect = shapes[0]
        if out.dim() < n or tuple(out.shape[-n:]) != expect:
            self._refuse(
                f"{_name(func)} changes the spatial shape {shapes[0]} to "
                f"{tuple(out.shape[max(out.dim() - n, 0) :])}"
            )

    def _refuse(self, reason: str) -> None:
        stack = getattr(_STATE, "stack", [])
        where = stack[-1] if stack else "<root>"
        raise UnsupportedLayerError(
            f"'{where}': {reason} inside a forward and cannot be partitioned exactly; use the "
            "nn.Module form (nn.Upsample, nn.MaxPool2d, ...) so spatial_parallel can replace it"
        )


def pre_hook(name: str, partitioned: bool) -> Any:
    """Forward pre-hook of every module: its path names refusals and call sites."""

    def hook(module: Any, args: Any) -> None:
        if not hasattr(_STATE, "stack"):
            _STATE.stack, _STATE.inside = [], 0
        _STATE.stack.append(name)
        if partitioned:
            _STATE.inside += 1

    return hook


def post_hook(partitioned: bool) -> Any:
    def hook(module: Any, args: Any, output: Any) -> None:
        if _STATE.stack:
            _STATE.stack.pop()
        if partitioned:
            _STATE.inside -= 1
            images = _images()
            if images.any_in(args):
                images.add(output)

    return hook


@contextmanager
def guarded(dec: Decomposition, x: torch.Tensor | tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Guard the functional calls of a root forward of ``x`` (a tensor or a tuple of them,
    blocks of one image) on ``dec``'s blocks."""
    outer = (getattr(_STATE, "stack", None), getattr(_STATE, "inside", 0),
             getattr(_STATE, "images", None))  # fmt: skip
    _STATE.stack, _STATE.inside, _STATE.images = [], 0, _Images()
    _STATE.images.add(x)
    try:
        with _FunctionalGuard(dec):
            yield
    finally:
        _STATE.stack = outer[0] if outer[0] is not None else []
        _STATE.inside, _STATE.images = outer[1], outer[2] or _Images()
