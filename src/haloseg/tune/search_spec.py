"""A validated search: the searched config keys (``Param``), what is optimised, the early
stopping rule (``Asha``) and what each process of a trial holds (``Resources``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Asha", "Param", "Resources", "SearchSpec"]

KINDS = ("grid", "choice", "uniform", "loguniform")
"""How a key varies: every value (grid), one drawn value (choice), a float drawn evenly
(uniform) or evenly in its logarithm (loguniform) between two ends."""


@dataclass(frozen=True)
class Param:
    """One searched config key."""

    key: str
    """Dotted config key, e.g. ``train.lr``."""
    kind: str
    """grid | choice | uniform | loguniform."""
    values: tuple[Any, ...]
    """The values (grid, choice) or the two ends (uniform, loguniform)."""


@dataclass(frozen=True, kw_only=True)
class Asha:
    """Asynchronous successive halving: trials that trail at a rung stop early."""

    grace_period: int | None = None
    """Steps every trial runs before it may be stopped (``train.val_every`` if unset)."""
    reduction_factor: int = 2
    """1 in this many trials goes on at each rung."""


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What each process of a trial holds."""

    cpus: float = 1.0
    """CPUs per process (also its torch threads, at least 1)."""
    gpus: float = 0.0
    """GPUs per process."""


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """A validated search."""

    params: tuple[Param, ...]
    metric: str = "dice_mean"
    mode: str = "max"
    samples: int = 1
    """Draws of the whole space (each draw runs every grid combination)."""
    seed: int = 0
    """Seed of the random draws."""
    scheduler: str = "asha"
    """asha | fifo (every trial runs to its last step)."""
    asha: Asha = field(default_factory=Asha)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1
    """Times a crashed trial restarts from its last checkpoint."""
    max_concurrent: int | None = None
    """Trials at once (as many as the resources allow if unset)."""

    @property
    def trials(self) -> int:
        """Trials in all: every grid combination once per sample."""
        grid = [p for p in self.params if p.kind == "grid"]
        return self.samples * math.prod(len(p.values) for p in grid)
