"""``spatial_parallel``: turn an unmodified ``nn.Module`` into one that runs on blocks.

Layers are converted in place by swapping their class for ``(Partitioned mixin, original)``;
parameters, buffers and ``state_dict`` keys do not change. Anything that cannot be
partitioned exactly is refused by name: unknown leaf layers at conversion, and spatial
functional calls (``F.interpolate``, ``F.pad``, reductions over spatial dims, ...) during the
forward, caught by a ``TorchFunctionMode``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from haloseg.errors import ConfigError, DecompositionError, UnsupportedLayerError
from haloseg.geometry import nearest_multiples
from haloseg.models.unet import Crop
from haloseg.parallel.comm import timed
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.layers import (
    LayerContext,
    Partitioned,
    PartitionedBatchNorm,
    PartitionedConv,
    PartitionedConvTranspose,
    PartitionedCrop,
    PartitionedGlobalPool,
    PartitionedGroupNorm,
    PartitionedInstanceNorm,
    PartitionedPool,
    PartitionedUpsample,
)

__all__ = ["spatial_parallel", "supported_layers"]

_ADAPTIVE = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_MIXINS: tuple[tuple[tuple[type[nn.Module], ...], type[Partitioned]], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), PartitionedConv),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), PartitionedConvTranspose),
    (
        (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        PartitionedPool,
    ),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), PartitionedBatchNorm),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), PartitionedInstanceNorm),
    ((nn.GroupNorm,), PartitionedGroupNorm),
    ((nn.Upsample,), PartitionedUpsample),
    ((Crop,), PartitionedCrop),
    (_ADAPTIVE, PartitionedGlobalPool),
)
_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.AlphaDropout,
)


def supported_layers() -> list[str]:
    """Names of the layer types ``spatial_parallel`` converts or passes through."""
    names = [cls.__name__ for classes, _ in _MIXINS for cls in classes]
    return names + [cls.__name__ for cls in _POINTWISE] + ["Softmax(dim=1)", "Dropout1d/2d/3d(p=0)"]


def _refusal(module: nn.Module) -> str | None:
    """Why ``module`` (a leaf) cannot be partitioned exactly, or None when it can."""
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and module.return_indices:
        return "return_indices=True gives block-local indices; use return_indices=False"
    if isinstance(module, _ADAPTIVE):
        size = module.output_size
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        if any(s != 1 for s in sizes):
            return f"adaptive pooling to output_size={size} is not supported; only 1 (global)"
    if isinstance(module, nn.Upsample) and module.mode not in (
        "nearest",
        "nearest-exact",
        "linear",
        "bilinear",
        "trilinear",
    ):
        return f"mode={module.mode!r} is not supported; use nearest or (bi/tri)linear"
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim != 1:
        return f"dim={module.dim} reaches across the image; only dim=1 (channels) is local"
    if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) and module.p > 0:
        return "channel dropout draws a different mask on every block; use nn.Dropout or p=0"
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return None
    if any(isinstance(module, classes) for classes, _ in _MIXINS):
        return None
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return None
    if isinstance(module, _POINTWISE):
        return None
    return (
        f"{type(module).__name__} is not a layer haloseg can partition; supported: "
        f"{', '.join(supported_layers())}"
    )


_CLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if (cls, mixin) not in _CLASSES:
        _CLASSES[(cls, mixin)] = type(f"{mixin.__name__}_{cls.__name__}", (mixin, cls), {})
    module.__class__ = _CLASSES[(cls, mixin)]


# --------------------------------------------------------------------- functional guard

_STATE = threading.local()

_DENY = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample, F.grid_sample, F.pad,
    F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm,
    F.fold, F.unfold, F.pixel_shuffle, F.pixel_unshuffle, torch.roll, torch.flip,
    torch.Tensor.roll, torch.Tensor.flip,
}  # fmt: skip
_DIM_FUNCS = {
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
    torch.Tensor.log_softmax, torch.cumsum, torch.Tensor.cumsum, torch.cumprod,
    torch.Tensor.cumprod, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
}  # fmt: skip


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _zero_pad(func: Any, args: tuple, kwargs: dict) -> bool:
    """``F.pad`` by nothing (MONAI's UpCat calls it on every forward) is harmless."""
    pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
    return func is F.pad and pad is not None and not any(pad)


class _FunctionalGuard(TorchFunctionMode):
    """Refuse spatial functional calls made outside partitioned layers during the forward."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(_STATE, "inside", 0):
            return func(*args, **kwargs)
        if func in _DENY and not _zero_pad(func, args, kwargs):
            self._refuse(f"{_name(func)} is a spatial operation")
        if func in _DIM_FUNCS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int) and self._is_spatial_dim(args[0], dim):
                self._refuse(f"{_name(func)}(dim={dim}) runs along a spatial dimension")
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and args:
            first = args[0][0] if isinstance(args[0], (list, tuple)) and args[0] else args[0]
            n = self.spatial_dims
            if isinstance(first, torch.Tensor) and first.dim() == n + 2:
                if out.dim() < n or tuple(out.shape[-n:]) != tuple(first.shape[-n:]):
                    self._refuse(
                        f"{_name(func)} changes the spatial shape {tuple(first.shape[-n:])} to "
                        f"{tuple(out.shape[max(out.dim() - n, 0) :])}"
                    )
        return out

    def _is_spatial_dim(self, t: Any, dim: int) -> bool:
        if not isinstance(t, torch.Tensor) or t.dim() != self.spatial_dims + 2:
            return False
        return dim % t.dim() >= 2

    def _refuse(self, reason: str) -> None:
        stack = getattr(_STATE, "stack", [])
        where = stack[-1] if stack else "<root>"
        raise UnsupportedLayerError(
            f"'{where}': {reason} inside a forward and cannot be partitioned exactly; use the "
            "nn.Module form (nn.Upsample, nn.MaxPool2d, ...) so spatial_parallel can replace it"
        )


def _pre_hook(name: str, partitioned: bool) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        if not hasattr(_STATE, "stack"):
            _STATE.stack, _STATE.inside = [], 0
        _STATE.stack.append(name)
        if partitioned:
            _STATE.inside += 1

    return hook


def _post_hook(partitioned: bool) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if _STATE.stack:
            _STATE.stack.pop()
        if partitioned:
            _STATE.inside -= 1

    return hook


@contextmanager
def _guarded(spatial_dims: int) -> Iterator[None]:
    outer = getattr(_STATE, "stack", None), getattr(_STATE, "inside", 0)
    _STATE.stack, _STATE.inside = [], 0
    try:
        with _FunctionalGuard(spatial_dims):
            yield
    finally:
        _STATE.stack, _STATE.inside = outer[0] if outer[0] is not None else [], outer[1]


# ------------------------------------------------------------------------- gradient sum


class _GradientSum:
    """Sum parameter gradients over the spatial group at the end of every backward.

    Only the gradient of the current backward is summed (so gradient accumulation over
    several backwards stays right): tensor hooks take each incoming gradient and let
    autograd accumulate zeros in its place; one all-reduce of them all runs when the
    backward finishes, and the sum is added. Adding the sum itself (not the difference to
    the local part) keeps the replicated gradients, and so the weights, the same bits on
    every rank.
    """

    def __init__(self, params: list[nn.Parameter], dec: Decomposition) -> None:
        self.params, self.dec = params, dec
        self.pending: dict[int, torch.Tensor] = {}
        for i, p in enumerate(params):
            p.register_hook(self._keep(i))

    def _keep(self, i: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self.pending:
                torch.autograd.Variable._execution_engine.queue_callback(self._sum)
            self.pending[i] = grad
            return torch.zeros_like(grad)

        return hook

    def _sum(self) -> None:
        pending, self.pending = self.pending, {}
        local = [
            pending[i].reshape(-1) if i in pending else p.new_zeros(p.numel())
            for i, p in enumerate(self.params)
        ]
        flat = torch.cat(local)
        with timed("grads", group_wide=True):
            dist.all_reduce(flat, group=self.dec.group)
        offset = 0
        for p in self.params:
            total = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = total.clone()
            else:
                p.grad += total


# ------------------------------------------------------------------------------ root


class SpatialParallelRoot:
    """Mixin of the converted model's root: checks the image, caches plans, guards calls."""

    _hs_dec: Decomposition

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dec = self._hs_dec
        bounds = dec.bounds_of(x.shape[2:])
        _check_alignment(bounds, dec)
        dec.forward_id += 1
        dec.forward_key = tuple(tuple(b) for b in bounds)
        try:
            with _guarded(dec.spatial_dims):
                return super().forward(x, *args, **kwargs)
        finally:
            dec.forward_key = None


def _check_alignment(bounds: list[list[int]], dec: Decomposition) -> None:
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


def downsampling_factor(model: nn.Module, spatial_dims: int) -> int:
    """The alignment blocks need: the largest (input scale x stride) of any strided layer,
    found by running the model on the meta device (no memory, no copy of the weights)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        return 1
    strided: list[tuple[nn.Module, int]] = []
    for m in model.modules():
        s = getattr(m, "stride", None)
        s = s if s is not None else getattr(m, "kernel_size", None)
        if isinstance(
            m,
            (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd),
        ) and not getattr(m, "transposed", False):
            stride = s if isinstance(s, (tuple, list)) else (s,) * spatial_dims
            if max(stride) > 1:
                strided.append((m, max(stride)))
    if not strided:
        return 1
    for probe in (256, 1024, 4096):
        sizes: list[int] = []
        hooks = [
            m.register_forward_pre_hook(
                lambda mod, a, s=s, n=probe, out=sizes: out.append(n // a[0].shape[-1] * s)
            )
            for m, s in strided
        ]
        meta = {
            k: torch.empty_like(v, device="meta")
            for k, v in model.state_dict(keep_vars=True).items()
        }
        shape = (1, first.in_channels, *([probe] * spatial_dims))
        x = torch.empty(shape, device="meta", dtype=first.weight.dtype)
        try:
            torch.func.functional_call(model, meta, (x,))
        except Exception:  # noqa: BLE001 - a probe size the network does not accept
            sizes.clear()
            continue
        finally:
            for h in hooks:
                h.remove()
        if sizes:
            return max(sizes)
    # No probe size ran: the product of all strides is a safe (if strict) alignment.
    return math.prod(s for _, s in strided)


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
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    for name, m in leaves:
        reason = _refusal(m)
        if reason is not None:
            raise UnsupportedLayerError(f"layer '{name or '<root>'}': {reason}")
    dec.align = max(dec.align, downsampling_factor(model, dec.spatial_dims))
    for name, m in model.named_modules():
        mixin = next((mx for classes, mx in _MIXINS if isinstance(m, classes)), None)
        if mixin is not None and not isinstance(m, Partitioned):
            _swap_class(m, mixin)
            m._hs = LayerContext(dec, name or "<root>")
        if m is not model or mixin is not None:
            m.register_forward_pre_hook(_pre_hook(name or "<root>", mixin is not None))
            m.register_forward_hook(_post_hook(mixin is not None))
    if not isinstance(model, Partitioned):
        _swap_class(model, SpatialParallelRoot)
        model._hs_dec = dec
    if sync_gradients and dec.size > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        model._hs_grad_sum = _GradientSum(params, dec)
    return model
