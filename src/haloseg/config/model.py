"""The ``model`` section: one of haloseg's U-Net presets, or a network class of another
library named by its dotted path (``model.target``) with its constructor's arguments.

A target is imported and its arguments are checked against the constructor's signature when
the config is made. The data's arguments (``spatial_dims``, ``in_channels``, and
``out_channels`` or ``classes``) are filled in from the data where the constructor has them
and ``model.kwargs`` leaves them out; given ones must agree with the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from haloseg.config.checks import check_choice
from haloseg.errors import ConfigError
from haloseg.models.target import check_arguments, data_arguments, resolve_target

__all__ = ["PRESET_OPTIONS", "ModelConfig"]

PRESET_OPTIONS = ("depth", "base_channels", "norm", "upsampling")
"""Settings of a haloseg U-Net preset that a config may replace."""


@dataclass(kw_only=True)
class ModelConfig:
    """The network: a haloseg U-Net preset, optionally with some of its settings replaced,
    or any importable ``nn.Module`` class (``target``) built with ``kwargs``."""

    preset: str | None = None
    """small | medium | large (small unless target is set)."""
    depth: int | None = None
    """Down-sampling levels (preset's if unset)."""
    base_channels: int | None = None
    """Channels of the first level (preset's if unset)."""
    norm: str | None = None
    """batch | instance | group | none (preset's if unset)."""
    upsampling: str | None = None
    """transposed | nearest | linear (preset's if unset)."""
    target: str | None = None
    """Dotted path of a network class instead of a preset, e.g. monai.networks.nets.SegResNet
    or segmentation_models_pytorch.Unet."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of target's constructor; spatial_dims, in_channels and out_channels
    (or classes) come from the data where left out."""

    def __post_init__(self) -> None:
        if self.target is not None:
            self._check_target()
            return
        if self.kwargs:
            raise ConfigError(
                f"model.kwargs={self.kwargs} applies to model.target only; set model.target "
                "(e.g. monai.networks.nets.SegResNet) or drop model.kwargs"
            )
        self.preset = self.preset or "small"
        check_choice("model.preset", self.preset, ("small", "medium", "large"))
        if self.norm is not None:
            check_choice("model.norm", self.norm, ("batch", "instance", "group", "none"))
        if self.upsampling is not None:
            check_choice("model.upsampling", self.upsampling, ("transposed", "nearest", "linear"))

    def _check_target(self) -> None:
        mixed = [f"model.{n}={getattr(self, n)!r}" for n in ("preset", *PRESET_OPTIONS)
                 if getattr(self, n) is not None]  # fmt: skip
        if mixed:
            null = " (model.preset=null on the command line)" if self.preset is not None else ""
            raise ConfigError(
                f"model.target={self.target} replaces haloseg's U-Net presets, so "
                f"{', '.join(mixed)} cannot go with it; drop {'them' if len(mixed) > 1 else 'it'}"
                f"{null} or drop model.target"
            )
        check_arguments(resolve_target(self.target), self.kwargs, self.target)

    def overrides(self) -> dict[str, Any]:
        """The settings of the preset that this config replaces."""
        if self.target is not None:
            raise ConfigError(
                f"model.target={self.target}: this needs one of haloseg's U-Net presets "
                "(model.preset); drop model.target for it"
            )
        return {n: getattr(self, n) for n in PRESET_OPTIONS if getattr(self, n) is not None}

    def check_data(self, **facts: int | None) -> None:
        """Refuse target arguments that disagree with the data's ``facts`` (``spatial_dims``,
        ``in_channels``, ``num_classes``; None where the config alone does not say)."""
        if self.target is not None:
            data_arguments(resolve_target(self.target), self.kwargs, self.target, **facts)

    def network(self, spatial_dims: int, in_channels: int, num_classes: int) -> dict[str, Any]:
        """How to build this network for the data: the run spec's ``model`` entry, which
        ``haloseg.models.build_network`` builds."""
        sizes = {"spatial_dims": spatial_dims, "in_channels": in_channels,
                 "out_channels": num_classes}  # fmt: skip
        if self.target is None:
            return {"preset": self.preset, **sizes, **self.overrides()}
        kwargs = data_arguments(resolve_target(self.target), self.kwargs, self.target,
                                spatial_dims=spatial_dims, in_channels=in_channels,
                                num_classes=num_classes)  # fmt: skip
        return {"target": self.target, "kwargs": kwargs, **sizes}
