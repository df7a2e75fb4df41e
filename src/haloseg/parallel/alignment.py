"""The alignment blocks need: a network's down-sampling factor, and the check of an image's
blocks against it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from haloseg.errors import DecompositionError
from haloseg.geometry import (
    ConvAxis,
    Unsupported,
    call_geometry,
    layer_entry,
    layer_geometry,
    nearest_multiples,
)
from haloseg.parallel.decomposition import Decomposition

__all__ = ["check_alignment", "downsampling_factor"]


def _stride(m: nn.Module, spatial_dims: int) -> int:
    """The largest stride of a registered down-sampling layer (1 for anything else)."""
    try:
        if layer_entry(m) is None:
            return 1
        geometry = layer_geometry(m, spatial_dims)
    except Unsupported:
        return 1
    if geometry.kind != "local" or getattr(m, "transposed", False):
        return 1
    try:
        rules = geometry.axis_rules([1024] * spatial_dims)
    except Exception:  # noqa: BLE001 - rules that need a real input (interpolation)
        return 1
    return max((r.stride for r in rules if isinstance(r, ConvAxis)), default=1)


class _Strides(TorchFunctionMode):
    """Records (input size along the last axis, stride) of every strided local call."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.n, self.seen = spatial_dims, []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        try:
            geometry = call_geometry(func, args, kwargs, self.n)
        except Unsupported:
            geometry = None
        x = args[0] if args else None
        if geometry is not None and geometry.kind == "local" and isinstance(x, torch.Tensor):
            rules = geometry.axis_rules(list(x.shape[2:]))
            stride = max((r.stride for r in rules if isinstance(r, ConvAxis)), default=1)
            if stride > 1:
                self.seen.append((x.shape[-1], stride))
        return func(*args, **kwargs)


def downsampling_factor(model: nn.Module, spatial_dims: int) -> int:
    """The alignment blocks need: the largest (input scale x stride) of any strided
    operation (layer or functional call), found by running the model on the meta device
    (no memory, no copy of the weights)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        return 1
    meta = {
        k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()
    }

    def strided_calls(probe: int) -> list[tuple[int, int]] | None:
        shape = (1, first.in_channels, *([probe] * spatial_dims))
        x = torch.empty(shape, device="meta", dtype=first.weight.dtype)
        strides = _Strides(spatial_dims)
        try:
            with strides:
                torch.func.functional_call(model, meta, (x,))
        except Exception:  # noqa: BLE001 - a probe size the network does not accept
            return None
        return strides.seen

    for probe in (256, 1024, 4096):
        small, large = strided_calls(probe), strided_calls(2 * probe)
        if small is None or large is None or len(small) != len(large):
            continue
        # A layer's input size is probe / scale + c (padding adds c): two probes give the
        # scale exactly, where one would confuse padding with scale.
        return max(
            (max(1, round(probe / max(n2 - n1, 1))) * s for (n1, s), (n2, _) in zip(small, large)),
            default=1,
        )
    # No probe size ran: the product of all strides is a safe (if strict) alignment.
    return math.prod(s for m in model.modules() if (s := _stride(m, spatial_dims)) > 1)


def check_alignment(bounds: list[list[int]], dec: Decomposition) -> None:
    """Refuse image sizes and block boundaries that are not multiples of ``dec.align``."""
    f = dec.align
    for d, b in enumerate(bounds):
        n, g = b[-1], len(b) - 1
        if n < g * f:
            raise DecompositionError(
                f"image size {n} along dimension {d} is smaller than {g} blocks x the "
                f"network's down-sampling factor {f}; use at least {g * f} or a coarser grid"
            )
        if n % f:
            lo, hi = nearest_multiples(n, f)
            raise DecompositionError(
                f"image size {n} along dimension {d} is not a multiple of the network's "
                f"down-sampling factor {f}; use {lo} or {hi}"
            )
        bad = [c for c in b[1:-1] if c % f]
        if bad:
            raise DecompositionError(
                f"block boundary {bad[0]} along dimension {d} is not a multiple of the "
                f"network's down-sampling factor {f}; use Decomposition.scatter or aligned bounds"
            )
