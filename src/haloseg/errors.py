"""The haloseg exception hierarchy: every user-facing error is a ``HalosegError``."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DecompositionError",
    "DependencyError",
    "HalosegError",
    "UnsupportedLayerError",
]


class HalosegError(Exception):
    """Base class of the errors haloseg raises for bad input; the CLI prints them as one line."""


class ConfigError(HalosegError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class DecompositionError(HalosegError, ValueError):
    """An image, grid or process group cannot be decomposed as asked."""


class UnsupportedLayerError(HalosegError, TypeError):
    """A layer or functional call cannot be partitioned exactly."""


class DataError(HalosegError, ValueError):
    """Input data is missing, malformed or of the wrong shape."""


class DependencyError(HalosegError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""
