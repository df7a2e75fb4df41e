"""Checks of single config values, shared by the sections: each refusal is one line naming
the key, its value and what it must be."""

from __future__ import annotations

import math

from haloseg.errors import ConfigError

__all__ = ["check_choice", "check_ignore_label", "check_positive"]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` of key ``name`` unless it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def check_positive(name: str, value: float, *, zero: bool = False) -> None:
    """Refuse ``value`` of key ``name`` unless it is finite and > 0 (>= 0 with ``zero``)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if zero else '> 0'}")


def check_ignore_label(ignore_label: int | None, num_classes: int | None) -> None:
    """Refuse an ignore label that is one of the classes ``0..num_classes-1``."""
    if ignore_label is not None and num_classes is not None and ignore_label < num_classes:
        raise ConfigError(
            f"data.ignore_label={ignore_label} is inside the class range 0..{num_classes - 1}; "
            f"give a value >= {num_classes} (e.g. data.ignore_label=255)"
        )
