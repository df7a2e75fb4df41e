"""Where a partitioned operation runs: its decomposition, its name, and its cached layouts.

A ``Site`` belongs to one partitioned layer or one functional call site. ``layout`` turns the
operation's per-axis rules (``haloseg.geometry``) and this rank's block into the exchange
plan and the output box, once per image layout (cached while a root forward runs); ``halo``
gives the haloed window. Every layout is computed from the global block boundaries only, so
all ranks reach the same verdict: a layout that cannot run is refused on every rank before
any halo message is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from haloseg.errors import DecompositionError
from haloseg.geometry import (
    AxisRule,
    Box,
    HaloPlan,
    boxes_from_bounds,
    out_bounds,
    plan_exchange,
)
from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.halo import HaloExchange, Padding, box_slices

__all__ = ["Layout", "Site"]

_CACHE_LIMIT = 64
"""Layouts kept per site (one per image layout and call within a forward)."""

Rules = list[AxisRule] | Callable[[list[int]], list[AxisRule]]


@dataclass(frozen=True)
class Layout:
    """Where this rank's block sits in an operation's input and output."""

    plan: HaloPlan
    in_bounds: list[list[int]]
    out_bounds: list[list[int]]
    out_box: Box
    rules: list[AxisRule]


@dataclass
class Site:
    """A partitioned layer's (or functional call's) place in the network."""

    dec: Decomposition
    path: str
    kind: str = ""
    stats: Decomposition | None = None
    """Wider group of BatchNorm's batch statistics (all data replicas), when there is one."""
    forward_id: int = -1
    calls: int = 0
    cache: dict[Any, Any] = field(default_factory=dict)

    def error(self, reason: str) -> DecompositionError:
        return DecompositionError(f"layer '{self.path}' ({self.kind}): {reason}")

    def cached(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per call of this site in a forward with this image layout."""
        dec = self.dec
        if self.forward_id != dec.forward_id:
            self.forward_id, self.calls = dec.forward_id, 0
        key = (dec.forward_key, self.calls)
        self.calls += 1
        if dec.forward_key is not None and key in self.cache:
            return self.cache[key]
        value = compute()
        if dec.forward_key is not None:
            if len(self.cache) >= _CACHE_LIMIT:  # many image sizes: start afresh
                self.cache.clear()
            self.cache[key] = value
        return value

    def layout(self, x: torch.Tensor, rules: Rules, periodic: bool = False) -> Layout:
        """This rank's plan for ``x``; ``rules`` may be a function of the global input sizes
        (interpolation tables)."""
        return self.cached(lambda: self.plan(self.dec.bounds_of(x.shape[2:]), rules, periodic))

    def plan(self, in_bounds: list[list[int]], rules: Rules, periodic: bool = False) -> Layout:
        dec = self.dec
        if callable(rules):
            rules = rules([b[-1] for b in in_bounds])
        try:
            outs = [out_bounds(b, r) for b, r in zip(in_bounds, rules, strict=True)]
        except DecompositionError as e:
            raise self.error(str(e)) from None
        for d, b in enumerate(outs):
            thin = [i for i in range(len(b) - 1) if b[i + 1] <= b[i]]
            if thin and b[-1] > 0:
                raise self.error(
                    f"its output of size {b[-1]} along dimension {d} leaves block {thin[0]} of "
                    f"the grid {dec.grid} empty (boundaries {b}); use a coarser grid or a "
                    "larger image"
                )
        return self.plan_to(in_bounds, outs, rules, periodic)

    def plan_to(
        self, in_bounds: list[list[int]], outs: list[list[int]], rules: list[AxisRule],
        periodic: bool = False,
    ) -> Layout:  # fmt: skip
        """The plan for given output boundaries (``plan`` derives them from the rules)."""
        dec = self.dec
        out_boxes = boxes_from_bounds(outs)
        windows = [
            tuple(r.in_window(a, b) for r, (a, b) in zip(rules, box, strict=True))
            for box in out_boxes
        ]
        shape = [b[-1] for b in in_bounds]
        try:
            plan = plan_exchange(dec.rank, boxes_from_bounds(in_bounds), windows, shape,
                                 [periodic] * len(rules), dec.grid)  # fmt: skip
        except DecompositionError as e:
            sizes = [[b[i + 1] - b[i] for i in range(len(b) - 1)] for b in in_bounds]
            raise self.error(
                f"{e} (input blocks {sizes} per axis, window {windows[dec.rank]}); use a "
                "coarser grid or a larger image"
            ) from None
        return Layout(plan, in_bounds, outs, out_boxes[dec.rank], rules)

    def halo(self, x: torch.Tensor, plan: HaloPlan, padding: Padding) -> torch.Tensor:
        """The haloed window of ``x`` (differentiable)."""
        if plan.is_identity:
            return x
        if plan.is_view:
            return x[box_slices(plan.recv[0].source)]
        return HaloExchange.apply(x, plan, padding, self.dec.peers, self.dec.group)
