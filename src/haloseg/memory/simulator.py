"""The memory model's bookkeeping: tensors as byte counts with references, the live bytes
and their high-water mark, and the forward recorded as a tape of ops and releases.

A tensor is freed when its last device reference goes; a saved tensor that swapping moved
to host memory holds host references only, so its device bytes are free until it comes
back (``to_device``) for backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from haloseg.memory.step_spec import StepSpec
from haloseg.memory.swap import SWAP_FLOOR

__all__ = ["Op", "Simulator"]


@dataclass
class _Tensor:
    """One tensor: its bytes, and who holds it where."""

    nbytes: int
    refs: int = 1
    """Python references and saved references held on the device."""
    host_refs: int = 0
    """Saved references held by a host copy."""
    on_host: bool = False
    device: bool = True
    grad: bool = True


@dataclass
class Op:
    """One layer as the forward ran it; tensors are indices into ``Simulator.tensors``."""

    inputs: list[int]
    out: int
    saves: list[int]
    """What the op saves for backward when it runs with saving on."""
    saved: list[int] = field(default_factory=list)
    inplace: bool = False
    cat: bool = False
    """The input gradients are views of the output gradient (concatenation)."""
    region: int | None = None
    skip_level: bool = False
    params: int = 0
    """Parameters of the layer: their gradients appear when its backward runs."""
    extra: int = -1
    """A tensor the op allocates only to save it (pool indices, halo slabs)."""


class Simulator:
    """Allocation bookkeeping: live bytes, the peak, and the forward as a tape of events."""

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.tensors: list[_Tensor] = []
        self.live = self.peak = 0
        self.ops: list[Op] = []
        self.events: list[tuple[str, object]] = []
        self.region: int | None = None
        self.skip_level = False
        self.swapped = self.kept_saved = self.halo = self.params = 0

    # -- allocation ------------------------------------------------------------------------
    def new(self, nbytes: int, *, grad: bool = True) -> int:
        self.tensors.append(_Tensor(int(nbytes), grad=grad))
        self._add(int(nbytes))
        return len(self.tensors) - 1

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def spike(self, nbytes: int) -> None:
        """A temporary that lives and dies inside one call."""
        self.peak = max(self.peak, self.live + int(nbytes))

    def revive(self, i: int) -> None:
        """Allocate tensor ``i`` again (a recomputation)."""
        t = self.tensors[i]
        t.refs, t.host_refs, t.on_host, t.device = 1, 0, False, True
        self._add(t.nbytes)

    def drop(self, i: int) -> None:
        t = self.tensors[i]
        t.refs -= 1
        self._maybe_free(t)

    def _maybe_free(self, t: _Tensor) -> None:
        # A host copy (host_refs) does not hold the device memory.
        if t.refs == 0 and t.device:
            t.device = False
            self.live -= t.nbytes

    # -- forward ---------------------------------------------------------------------------
    def op(
        self,
        inputs: Sequence[int],
        out_bytes: int,
        saves: Sequence[int] = (),
        *,
        save_out: bool = False,
        inplace: bool = False,
        cat: bool = False,
        extra: int = 0,
        params: int = 0,
    ) -> int:
        """Run a layer: allocate its output (none when ``inplace``), save ``saves`` (the
        output too with ``save_out``, and ``extra`` new bytes such as pool indices)."""
        out = inputs[0] if inplace else self.new(out_bytes)
        saves = list(saves) + ([out] if save_out else [])
        op = Op(list(inputs), out, saves, inplace=inplace, cat=cat, region=self.region,
                 skip_level=self.skip_level, params=params)  # fmt: skip
        self.params += params
        if extra:
            op.extra = self.new(extra, grad=False)
            op.saves.append(op.extra)
        self.ops.append(op)
        self.events.append(("op", op))
        if self.region is None:  # inside a checkpointed block nothing is saved
            self._save_all(op)
        if extra and self.region is None:
            # Inside a checkpointed block the halo slabs stay on its tape until backward.
            self.drop(op.extra)
        return out

    def _save_all(self, op: Op) -> None:
        for i in dict.fromkeys(op.saves):
            t = self.tensors[i]
            op.saved.append(i)
            if not t.on_host and t.host_refs == 0 and self._swaps(t, op):
                t.on_host = True
                self.swapped += t.nbytes
            if t.on_host:
                t.host_refs += 1
            else:
                if t.refs == 1:
                    self.kept_saved += t.nbytes
                t.refs += 1

    def _swaps(self, t: _Tensor, op: Op) -> bool:
        s = self.spec
        if s.swap == "none" or t.nbytes < SWAP_FLOOR:
            return False
        if s.swap == "all":
            return True
        if s.swap == "skips":
            return op.skip_level
        if s.swap == "min_bytes":
            return t.nbytes >= s.swap_min_bytes
        return self.kept_saved + t.nbytes > s.swap_budget  # budget

    def release(self, i: int) -> None:
        """Python lets go of tensor ``i``."""
        self.drop(i)
        self.events.append(("drop", i))

    @contextmanager
    def in_region(self, region: int | None) -> Iterator[None]:
        outer, self.region = self.region, region
        try:
            yield
        finally:
            self.region = outer

    # -- backward --------------------------------------------------------------------------
    def to_device(self, i: int) -> None:
        """Tensor ``i``, swapped to host, comes back to the device (if not already there)."""
        t = self.tensors[i]
        if t.on_host and not t.device:
            t.device = True
            self._add(t.nbytes)

    def unsave(self, op: Op) -> None:
        """Let go of what ``op`` saved: its backward has run."""
        for s in op.saved:
            t = self.tensors[s]
            if t.on_host:
                t.host_refs -= 1
                if t.host_refs == 0 and t.refs == 0 and t.device:
                    t.device = False
                    self.live -= t.nbytes
            else:
                self.drop(s)
        op.saved = []
