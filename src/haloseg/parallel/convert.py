"""``spatial_parallel``: turn an unmodified ``nn.Module`` into one that runs on blocks.

Every module is looked up in the geometry registry (``haloseg.geometry.registry``). Layers
with a partitioned execution are converted in place by swapping their class for
``(Partitioned mixin, original)``; parameters, buffers and ``state_dict`` keys do not change.
Containers and registered composites run their own forward, whose functional calls are
partitioned or refused one by one (``haloseg.parallel.guard``). Anything the registry refuses
(an unknown leaf, a subclass overriding a registered forward, an option that cannot be exact)
is refused at conversion, naming the module's path, before any message is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from haloseg.errors import ConfigError, UnsupportedLayerError
from haloseg.geometry import Unsupported, layer_entry, layer_geometry, registered_layers
from haloseg.parallel.alignment import check_alignment, downsampling_factor
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.gradients import GradientSum
from haloseg.parallel.guard import guarded, post_hook, pre_hook
from haloseg.parallel.layers import EXECUTIONS, Partitioned
from haloseg.parallel.site import Site

__all__ = [
    "downsampling_factor",
    "partitioned_forward",
    "spatial_parallel",
    "supported_layers",
]


def supported_layers() -> list[str]:
    """Names of the layer types ``spatial_parallel`` converts or passes through."""
    return registered_layers()


_CLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if (cls, mixin) not in _CLASSES:
        name = f"{mixin.__name__}_{cls.__name__}"
        _CLASSES[(cls, mixin)] = type(name, (mixin, cls), {"_hs_swapped": True})
    module.__class__ = _CLASSES[(cls, mixin)]


@contextmanager
def partitioned_forward(
    dec: Decomposition, x: torch.Tensor, *more: torch.Tensor, image: bool = True
) -> Iterator[None]:
    """One root forward on ``dec``'s blocks of ``x`` and of ``more`` tensors, blocks of the
    same image (a pipeline stage's running activation and the skips it carries).

    Layers cache their exchange plans under the global boundaries of all of them, and the
    functional guard treats each as a block of the image. ``image`` says ``x`` is the image
    itself, whose sizes and boundaries must be multiples of the network's down-sampling
    factor (a tensor deeper in the network need not be).
    """
    bounds = dec.bounds_of(x.shape[2:])
    if image:
        check_alignment(bounds, dec)
    key = tuple(tuple(b) for b in bounds)
    if more:  # the skips' layouts need not follow from x's (valid padding rounds sizes)
        key += tuple(tuple(tuple(b) for b in dec.bounds_of(t.shape[2:])) for t in more)
    dec.forward_id += 1
    dec.forward_key = key
    try:
        with guarded(dec, (x, *more)):
            yield
    finally:
        dec.forward_key = None


class SpatialParallelRoot:
    """Mixin of the converted model's root: checks the image, caches plans, guards calls."""

    _hs_dec: Decomposition

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with partitioned_forward(self._hs_dec, x):
            return super().forward(x, *args, **kwargs)


def _execution(name: str, m: nn.Module, spatial_dims: int) -> type[Partitioned] | None:
    """The mixin ``m`` takes, or None when it runs its own forward; refuses by path."""
    try:
        layer_geometry(m, spatial_dims)
        found = layer_entry(m)
    except Unsupported as e:
        raise UnsupportedLayerError(f"layer '{name or '<root>'}': {e}") from None
    if found is None or found[1].execution is None:
        return None
    return EXECUTIONS[found[1].execution]


def _called_modules(model: nn.Module, spatial_dims: int) -> set[int] | None:
    """Ids of the modules a forward calls, from one run on the meta device (no memory); None
    when no probe size runs. Modules a forward never calls (a classifier head beside the
    features a U-Net uses) are neither converted nor refused."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        return None
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, a: called.add(id(mod)))
             for m in model.modules()]  # fmt: skip
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in model.state_dict(keep_vars=True).items()}  # fmt: skip
    try:
        for side in (256, 384):
            x = torch.empty((1, first.in_channels, *([side] * spatial_dims)), device="meta",
                            dtype=first.weight.dtype)  # fmt: skip
            try:
                torch.func.functional_call(model, meta, (x,))
                return called
            except Exception:  # noqa: BLE001 - a probe size the network does not accept
                called.clear()
        return None
    finally:
        for h in hooks:
            h.remove()


def spatial_parallel(
    model: nn.Module, decomposition: Decomposition, *, sync_gradients: bool = True
) -> nn.Module:
    """Convert ``model`` in place to run on this rank's block of every image.

    The converted model takes ``(N, C, *block)`` and returns ``(N, C', *block')`` such that
    gathering the blocks of all ranks gives exactly the single-process result. Parameters stay
    replicated; with ``sync_gradients`` their gradients are summed over the decomposition's
    group after each backward, so an optimizer step equals the single-process step (turn it
    off when a ``data_parallel`` wrapper sums them instead). Raises ``UnsupportedLayerError``
    naming the layer path for anything that cannot be partitioned exactly.
    """
    dec = decomposition
    if isinstance(model, SpatialParallelRoot) or any(
        isinstance(m, Partitioned) for m in model.modules()
    ):
        raise ConfigError(
            f"{type(model).__name__} is already converted by spatial_parallel; convert an "
            "unconverted copy (copy.deepcopy before the first conversion) for another grid"
        )
    called = _called_modules(model, dec.spatial_dims)
    mixins = {
        name: _execution(name, m, dec.spatial_dims) if called is None or id(m) in called else None
        for name, m in model.named_modules()
    }
    dec.align = max(dec.align, downsampling_factor(model, dec.spatial_dims))
    for name, m in model.named_modules():
        mixin = mixins[name]
        if mixin is not None:
            kind = type(m).__name__
            _swap_class(m, mixin)
            m._hs = Site(dec, name or "<root>", kind)
        if m is not model or mixin is not None:
            m.register_forward_pre_hook(pre_hook(name or "<root>", mixin is not None))
            m.register_forward_hook(post_hook(mixin is not None))
    if not isinstance(model, Partitioned):
        _swap_class(model, SpatialParallelRoot)
        model._hs_dec = dec
    if sync_gradients and dec.size > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        model._hs_grad_sum = GradientSum(params, dec)
    return model
