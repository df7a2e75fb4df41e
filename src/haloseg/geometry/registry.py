"""One registry of what modules and functional calls mean for blocks of an image.

For a module, ``layer_geometry`` gives its ``Geometry`` (``haloseg.geometry.ops``) or raises
``Unsupported`` with the reason; ``haloseg.geometry.calls`` does the same for functional
calls. A module matches an entry only when
its class's ``forward`` is the registered class's own: a subclass that overrides ``forward``
computes something else and is refused unless it registers itself (``register_layer``).

Each entry also names its partitioned execution (``execution``): ``spatial_parallel`` swaps
the module's class for the mixin of that name; entries without one run their own forward,
whose functional calls are partitioned or refused one by one. ``spatial_parallel``,
``receptive_field``, the inference planner and the memory probes all read this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from haloseg.geometry import ops
from haloseg.geometry.ops import Geometry, Unsupported, tuple_of

__all__ = [
    "LayerEntry",
    "layer_entry",
    "layer_geometry",
    "register_layer",
    "registered_layers",
]

GeometryFn = Callable[[nn.Module, int], Geometry]


@dataclass(frozen=True)
class LayerEntry:
    name: str
    """``module.QualName`` of the registered class."""
    geometry: GeometryFn
    execution: str | None = None
    """Name of the partitioned execution; None: the module runs its own forward."""


_LAYERS: dict[str, LayerEntry] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _add(classes: Sequence[type | str], geometry: GeometryFn, execution: str | None = None) -> None:
    for cls in classes:
        name = cls if isinstance(cls, str) else _qualname(cls)
        _LAYERS[name] = LayerEntry(name, geometry, execution)


def register_layer(
    cls: type[nn.Module], geometry: str | GeometryFn = "composite"
) -> type[nn.Module]:
    """Declare what ``cls`` (a module class with its own ``forward``) computes.

    ``"composite"`` (the default): its forward only calls operations haloseg partitions or
    refuses by name (convolutions, ``F.interpolate``, ``F.pad``, pooling, pointwise
    functions), so it runs as written with each call partitioned; e.g. a weight-standardised
    convolution whose forward calls ``F.conv2d``. ``"pointwise"``: each output voxel depends
    on the same input voxel only. Or a function ``(module, spatial_dims) -> Geometry``.
    Usable as a class decorator; returns ``cls``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer takes an nn.Module class, not {cls!r}")
    if geometry == "composite":
        _add([cls], lambda m, n: Geometry("composite"))
    elif geometry == "pointwise":
        _add([cls], lambda m, n: ops.pointwise())
    elif callable(geometry):
        _add([cls], geometry)
    else:
        raise ValueError(f"geometry={geometry!r}; use 'composite', 'pointwise' or a function")
    return cls


def registered_layers() -> list[str]:
    """Class names with an entry (torch's without their module path)."""
    return sorted(n.removeprefix("torch.nn.modules.").split(".")[-1] for n in _LAYERS)


def _is_swapped(cls: type) -> bool:
    return bool(getattr(cls, "_hs_mixin", False) or cls.__dict__.get("_hs_swapped"))


def layer_entry(module: nn.Module) -> tuple[type, LayerEntry] | None:
    """The registered class ``module`` derives from, and its entry (None: not registered).

    Raises ``Unsupported`` for a subclass that overrides the registered class's forward.
    """
    own = [c for c in type(module).__mro__ if not _is_swapped(c)]
    for cls in own:
        entry = _LAYERS.get(_qualname(cls))
        if entry is None:
            continue
        first = own[0]
        if first is not cls and getattr(first, "forward", None) is not cls.forward:
            raise Unsupported(
                f"{first.__name__} overrides {cls.__name__}.forward, so what it computes is "
                f"unknown; if its forward only calls operations haloseg partitions (F.conv2d, "
                f"F.interpolate, F.pad, pooling, pointwise), declare it with "
                f"haloseg.register_layer({first.__name__})"
            )
        return cls, entry
    return None


def layer_geometry(module: nn.Module, spatial_dims: int) -> Geometry:
    """The geometry of ``module``; ``composite`` for an unregistered module with children."""
    found = layer_entry(module)
    if found is not None:
        return found[1].geometry(module, spatial_dims)
    if next(module.children(), None) is not None:
        return Geometry("composite")
    raise Unsupported(
        f"{type(module).__name__} is not a layer haloseg can partition; supported: "
        f"{', '.join(registered_layers())}; declare your own with haloseg.register_layer"
    )


# ------------------------------------------------------------------------- torch modules


def _conv(m: Any, n: int) -> Geometry:
    if m.transposed:
        return ops.conv_transpose(n, m.kernel_size, m.stride, m.padding, m.output_padding,
                                  m.dilation)  # fmt: skip
    return ops.conv(n, m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode)


def _pool(m: Any, n: int) -> Geometry:
    is_max = isinstance(m, nn.modules.pooling._MaxPoolNd)
    if is_max and m.return_indices:
        raise Unsupported("return_indices=True gives block-local indices; use False")
    return ops.pool(n, m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1),
                    m.ceil_mode, is_max=is_max)  # fmt: skip


def _adaptive(m: Any, n: int) -> Geometry:
    if any(s != 1 for s in tuple_of(m.output_size, n)):
        raise Unsupported(f"adaptive pooling to output_size={m.output_size} is not supported; "
                          "only 1 (global)")  # fmt: skip
    return ops.global_statistics("adaptive pooling reads the whole image")


def _upsample(m: Any, n: int) -> Geometry:
    return ops.interpolate(n, m.size, m.scale_factor, m.mode, m.align_corners,
                           getattr(m, "recompute_scale_factor", None))  # fmt: skip


def _pad_module(m: Any, n: int) -> Geometry:
    name = type(m).__name__
    mode = ("reflect" if "Reflection" in name else "replicate" if "Replication" in name
            else "circular" if "Circular" in name else "constant")  # fmt: skip
    return ops.pad(n, m.padding, mode, getattr(m, "value", 0.0))


def _norm(what: str) -> GeometryFn:
    def geometry(m: Any, n: int) -> Geometry:
        running = getattr(m, "running_mean", None) is not None
        if getattr(m, "track_running_stats", False) and not m.training and running:
            return ops.pointwise()  # running statistics: an affine map per channel
        return ops.global_statistics(what)

    return geometry


def _dim_one(m: Any, n: int) -> Geometry:
    if m.dim != 1:
        raise Unsupported(f"dim={m.dim} reaches across the image; only dim=1 (channels) is local")
    return ops.pointwise()


def _channel_dropout(m: Any, n: int) -> Geometry:
    if m.p > 0:
        raise Unsupported("channel dropout draws a different mask on every block; use "
                          "nn.Dropout or p=0")  # fmt: skip
    return ops.pointwise()


def _crop(m: Any, n: int) -> Geometry:
    margins = tuple_of(m.margins, n)
    return ops.pad(n, [-c for c in reversed(margins) for _ in range(2)])


def _layer_norm(m: Any, n: int) -> Geometry:
    raise Unsupported("LayerNorm normalises over the trailing (spatial) axes of an image")


_NORM_BATCH = "BatchNorm in training mode normalises with batch statistics over the image"
_NORM_IMAGE = "{} normalises with statistics over the whole image"

_add([nn.Conv1d, nn.Conv2d, nn.Conv3d], _conv, "conv")
_add([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d], _conv, "conv_transpose")
_add([nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d],
     _pool, "pool")  # fmt: skip
_add([nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d], _adaptive, "global_pool")  # fmt: skip
_add([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d], _norm(_NORM_BATCH), "batch_norm")
_add([nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d],
     _norm(_NORM_IMAGE.format("InstanceNorm")), "instance_norm")  # fmt: skip
_add([nn.GroupNorm], _norm(_NORM_IMAGE.format("GroupNorm")), "group_norm")
_add([nn.LayerNorm], _layer_norm)
_add([nn.Upsample], _upsample, "upsample")
_add([nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d,
      nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
      nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
      nn.CircularPad2d, nn.CircularPad3d], _pad_module, "pad")  # fmt: skip
_add(["haloseg.models.unet.Crop"], _crop, "pad")
_add([nn.Softmax, nn.LogSoftmax], _dim_one)
_add([nn.Dropout1d, nn.Dropout2d, nn.Dropout3d], _channel_dropout)
_add([nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
      nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
      nn.Softplus, nn.Dropout, nn.AlphaDropout,
      "monai.networks.blocks.activation.Swish", "monai.networks.blocks.activation.Mish",
      "monai.networks.blocks.activation.MemoryEfficientSwish"],
     lambda m, n: ops.pointwise())  # fmt: skip
# Containers, and library modules whose forward is made of operations judged one by one.
_add([nn.Sequential, nn.ModuleList, nn.ModuleDict,
      "monai.networks.layers.simplelayers.ChannelPad"],
     lambda m, n: Geometry("composite"))  # fmt: skip
