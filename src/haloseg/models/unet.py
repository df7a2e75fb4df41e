"""A plain, configurable 2-D/3-D U-Net built only from layer modules.

Every spatial operation (conv, norm, activation, pool, upsample, crop) is an ``nn.Module`` and
``UNet.forward`` uses nothing but module calls and a channel concatenation, so a distributed
converter can find and replace each layer through ``named_modules()``.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import nn

from haloseg.errors import ConfigError, DataError

__all__ = ["PRESETS", "Crop", "UNet", "count_layers", "unet_preset"]

NORMS = ("batch", "instance", "group", "none")
UPSAMPLINGS = ("transposed", "nearest", "linear")
PADDINGS = ("same", "valid")

_CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL: dict[int, type[nn.Module]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH: dict[int, type[nn.Module]] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Crop(nn.Module):
    """Remove ``margins[d]`` elements from both ends of spatial dim ``d`` of (N, C, *spatial)."""

    def __init__(self, margins: tuple[int, ...]) -> None:
        super().__init__()
        if not margins or any(m < 0 for m in margins):
            raise ConfigError(
                f"Crop margins={margins!r} must be a non-empty tuple of integers >= 0; "
                "pass one margin per spatial dim"
            )
        self.margins = tuple(int(m) for m in margins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        if len(spatial) != len(self.margins):
            raise DataError(
                f"Crop with {len(self.margins)} margins got a tensor of shape {tuple(x.shape)}; "
                f"expected (N, C) plus {len(self.margins)} spatial dims"
            )
        if any(size <= 2 * m for size, m in zip(spatial, self.margins, strict=True)):
            raise DataError(
                f"Crop margins={self.margins} remove all of spatial shape {tuple(spatial)}; "
                "use a larger input"
            )
        index = tuple(slice(m, size - m) for size, m in zip(spatial, self.margins, strict=True))
        return x[(slice(None), slice(None), *index)]

    def extra_repr(self) -> str:
        return f"margins={self.margins}"


class UNet(nn.Module):
    """A U-Net mapping (N, in_channels, *spatial) to (N, out_channels, *spatial_out).

    Keyword-only arguments:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image.
        out_channels: channels of the output (e.g. number of classes).
        depth: number of down-samplings; the down-sampling factor is ``2**depth``.
        base_channels: channels at level 0.
        channel_multiplier: level ``l`` has ``round(base_channels * channel_multiplier**l)``.
        convs_per_level: 3x3 convolutions (conv, norm, activation) per block.
        norm: "batch", "instance" (affine), "group" (affine) or "none".
        norm_groups: upper bound on GroupNorm groups; lowered until it divides the channels.
        upsampling: "transposed" (kernel 2, stride 2), "nearest" or "linear" (Upsample by 2
            followed by a 1x1 conv).
        padding: "same" keeps the spatial size (input must be a multiple of ``2**depth``);
            "valid" uses unpadded convs and crops the encoder skips, so the output is smaller
            than the input (see ``output_size``).

    Submodules: ``encoder`` holds ``depth + 1`` blocks (the last is the bottleneck), ``pools``
    ``depth`` max-pools, and ``ups``, ``crops`` (valid padding only) and ``decoder`` are ordered
    from the deepest level up; ``head`` is the final 1x1 conv.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        depth: int = 4,
        base_channels: int = 16,
        channel_multiplier: float = 2.0,
        convs_per_level: int = 2,
        norm: str = "batch",
        norm_groups: int = 8,
        upsampling: str = "transposed",
        padding: str = "same",
    ) -> None:
        super().__init__()
        _check_choice("spatial_dims", spatial_dims, (2, 3))
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("depth", depth),
            ("base_channels", base_channels),
            ("convs_per_level", convs_per_level),
            ("norm_groups", norm_groups),
        ):
            _check_positive_int(name, value)
        _check_choice("norm", norm, NORMS)
        _check_choice("upsampling", upsampling, UPSAMPLINGS)
        _check_choice("padding", padding, PADDINGS)
        channels = _level_channels(base_channels, channel_multiplier, depth)

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.channels = channels
        self.convs_per_level = convs_per_level
        self.norm = norm
        self.norm_groups = norm_groups
        self.upsampling = upsampling
        self.padding = padding

        block_in = (in_channels, *channels[:-1])
        self.encoder = nn.ModuleList(
            self._block(cin, cout) for cin, cout in zip(block_in, channels, strict=True)
        )
        self.pools = nn.ModuleList(
            _POOL[spatial_dims](kernel_size=2, stride=2) for _ in range(depth)
        )
        levels = range(depth - 1, -1, -1)
        self.ups = nn.ModuleList(self._up(channels[lvl + 1], channels[lvl]) for lvl in levels)
        margins = _crop_margins(depth, self._conv_shrink)
        self.crops = nn.ModuleList(
            Crop((margins[lvl],) * spatial_dims) for lvl in levels if padding == "valid"
        )
        self.decoder = nn.ModuleList(
            self._block(2 * channels[lvl], channels[lvl]) for lvl in levels
        )
        self.head = _CONV[spatial_dims](channels[0], out_channels, kernel_size=1)

    @property
    def downsampling_factor(self) -> int:
        """The total down-sampling factor ``2**depth``."""
        return 2**self.depth

    @property
    def _conv_shrink(self) -> int:
        """How much one block shrinks a spatial dim (0 with same padding)."""
        return 2 * self.convs_per_level if self.padding == "valid" else 0

    def output_size(self, input_size: int) -> int:
        """Output length of one spatial dim for an input of ``input_size``.

        Raises ``ConfigError`` when the size does not go through the network exactly (a pool
        sees an odd size or a block shrinks the size to nothing), naming the nearest valid sizes.
        """
        out = _trace_size(input_size, self.depth, self._conv_shrink)
        if out is not None:
            return out

        def fits(n: int) -> bool:
            return _trace_size(n, self.depth, self._conv_shrink) is not None

        below = next((n for n in range(input_size - 1, 0, -1) if fits(n)), None)
        above = next(n for n in itertools.count(input_size + 1) if fits(n))
        nearest = f"{below} or {above}" if below is not None else str(above)
        raise ConfigError(
            f"input size {input_size} does not fit UNet(depth={self.depth}, "
            f"padding={self.padding!r}, convs_per_level={self.convs_per_level}); use {nearest}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, in_channels, *spatial) to (N, out_channels, *spatial_out)."""
        skips: list[torch.Tensor] = []
        for block, pool in zip(self.encoder[:-1], self.pools, strict=True):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.encoder[-1](x)
        for i, (up, block) in enumerate(zip(self.ups, self.decoder, strict=True)):
            x = up(x)
            skip = skips.pop()
            if self.crops:
                skip = self.crops[i](skip)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)

    def _block(self, in_channels: int, out_channels: int) -> nn.Sequential:
        pad = 1 if self.padding == "same" else 0
        layers: list[nn.Module] = []
        for i in range(self.convs_per_level):
            cin = in_channels if i == 0 else out_channels
            conv = _CONV[self.spatial_dims](
                cin, out_channels, kernel_size=3, padding=pad, bias=self.norm == "none"
            )
            layers.append(conv)
            if self.norm != "none":
                layers.append(self._norm_layer(out_channels))
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    def _norm_layer(self, channels: int) -> nn.Module:
        if self.norm == "batch":
            return _BATCH[self.spatial_dims](channels)
        if self.norm == "instance":
            return _INSTANCE[self.spatial_dims](channels, affine=True)
        groups = min(self.norm_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels, affine=True)

    def _up(self, in_channels: int, out_channels: int) -> nn.Module:
        if self.upsampling == "transposed":
            return _CONV_T[self.spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)
        mode = "nearest" if self.upsampling == "nearest" else _LINEAR_MODE[self.spatial_dims]
        align = None if mode == "nearest" else False
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode=mode, align_corners=align),
            _CONV[self.spatial_dims](in_channels, out_channels, kernel_size=1),
        )


PRESETS: dict[str, dict[str, Any]] = {
    "small": {"depth": 4, "base_channels": 8, "convs_per_level": 2},
    "medium": {"depth": 4, "base_channels": 32, "convs_per_level": 2},
    # 143 layers with batch norm: the scale of the 149-layer U-Net of the Summit study.
    "large": {"depth": 5, "base_channels": 32, "convs_per_level": 4},
}


def unet_preset(
    name: str, *, spatial_dims: int, in_channels: int, out_channels: int, **overrides: Any
) -> UNet:
    """Build the ``PRESETS[name]`` U-Net; ``overrides`` replace any of its keyword arguments."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is not one of {', '.join(PRESETS)}; pick one of those")
    accepted = set(inspect.signature(UNet.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ConfigError(
            f"unet_preset got unknown override(s) {', '.join(unknown)}; "
            f"use UNet arguments: {', '.join(sorted(accepted))}"
        )
    kwargs = {**PRESETS[name], **overrides}
    return UNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs
    )


def count_layers(model: nn.Module) -> int:
    """Number of layers in ``model``: leaf modules (conv, norm, activation, pool, upsample, ...)."""
    return sum(
        1
        for m in model.modules()
        if next(m.children(), None) is None and not isinstance(m, _CONTAINERS)
    )


def _level_channels(base_channels: int, multiplier: float, depth: int) -> tuple[int, ...]:
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier <= 0:
        raise ConfigError(
            f"channel_multiplier={multiplier!r} must be a number > 0; "
            "use e.g. 2.0 to double the channels per level"
        )
    channels = tuple(int(round(base_channels * multiplier**lvl)) for lvl in range(depth + 1))
    if min(channels) < 1:
        raise ConfigError(
            f"channel_multiplier={multiplier!r} with base_channels={base_channels} and "
            f"depth={depth} gives channels {channels}; raise base_channels or channel_multiplier"
        )
    return channels


def _crop_margins(depth: int, shrink: int) -> list[int]:
    """Per-level skip crop margin for blocks shrinking each dim by ``shrink``, indexed by level.

    The difference between encoder output and upsampled decoder size does not depend on the
    input size: it is ``2 * shrink`` at the deepest skip and ``D_l = 2 * D_{l+1} + 4 * shrink``
    above it, half of which is cropped from each end.
    """
    margins = [0] * depth
    diff = 2 * shrink
    for lvl in range(depth - 1, -1, -1):
        margins[lvl] = diff // 2
        diff = 2 * diff + 4 * shrink
    return margins


def _trace_size(size: int, depth: int, shrink: int) -> int | None:
    """Output length of one dim, or None when ``size`` does not go through exactly."""
    for _ in range(depth):
        size -= shrink
        if size < 1 or size % 2:
            return None
        size //= 2
    size -= shrink
    if size < 1:
        return None
    for _ in range(depth):
        size = 2 * size - shrink
        if size < 1:
            return None
    return size


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    # Exact type match so that 2.0 or True are not taken for 2 or 1.
    if not any(type(value) is type(c) and value == c for c in choices):
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}={value!r} is not one of {options}; pick one of those")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1; pass a positive integer")
