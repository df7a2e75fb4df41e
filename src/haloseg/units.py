"""Byte sizes: as people write them (``--max-memory 2GB``, ``memory.swap_budget=512MiB``,
``--device-memory 80GB``) and as messages print them (``1.5 GiB``)."""

from __future__ import annotations

import math

from haloseg.errors import ConfigError

__all__ = ["GIB", "MIB", "format_bytes", "parse_bytes"]

MIB = 2**20
GIB = 2**30

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": MIB, "GIB": GIB, "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5e9"`` -> bytes."""
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    unit = t[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"memory size {text!r} is not like 2GB, 512MiB or 1.5e9")
    return int(value)


def format_bytes(nbytes: float, unit: str = "GiB", digits: int = 1) -> str:
    """``nbytes`` in ``unit`` (B, KB .. TB, KiB .. TiB) with ``digits`` decimals: ``"1.5 GiB"``."""
    return f"{nbytes / _UNITS[unit.upper()]:.{digits}f} {unit}"
