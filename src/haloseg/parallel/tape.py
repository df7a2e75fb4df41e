"""Tapes: what a checkpointed region received, recorded once and replayed on recomputation.

Every forward communication (halos, normalisation statistics, reductions) goes through
``taped`` (or, for halos, checks ``active_tapes``): outside a checkpointed region it simply
communicates; inside, the first forward records what arrived and the recomputation in
backward replays it without sending a message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from haloseg.errors import DecompositionError

__all__ = ["Tape", "active_tapes", "taped", "taping"]


class Tape:
    """What a region's forward received (halos, normalisation statistics, reductions), in
    call order, each entry with its kind and a key of what was asked for.

    A checkpointed region records its tape on the first forward and replays it each time the
    region is recomputed in backward (twice for a graph kept with ``retain_graph``): the
    recomputation then sends no message and uses exactly what the first forward received.
    A recomputation asking for something else than was recorded (the region switched to
    eval mode, a data-dependent branch) is an error, never a wrong answer.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any, Any]] = []
        self.cursor = 0
        self.replaying = False

    def record(self, kind: str, key: Any, value: Any) -> None:
        self.entries.append((kind, key, value))

    def replay(self, kind: str, key: Any) -> Any:
        if self.cursor >= len(self.entries):
            raise DecompositionError(
                f"a checkpointed region's recomputation asked for {kind} communication its "
                "forward did not do; keep the region's mode (train/eval) and control flow the "
                "same between forward and backward"
            )
        got_kind, got_key, value = self.entries[self.cursor]
        if (got_kind, got_key) != (kind, key):
            raise DecompositionError(
                f"a checkpointed region's recomputation asked for {kind} communication where "
                f"its forward did {got_kind}; keep the region's mode (train/eval) and control "
                "flow the same between forward and backward"
            )
        self.cursor += 1
        return value


_STACK = threading.local()
"""Per thread: the tapes of the checkpointed regions running now (CUDA backward, and so the
recomputation, runs in autograd's own thread)."""


def active_tapes() -> list[Tape]:
    """This thread's tapes of the checkpointed regions running now, innermost last."""
    if not hasattr(_STACK, "tapes"):
        _STACK.tapes = []
    return _STACK.tapes


@contextmanager
def taping(tape: Tape, *, replay: bool) -> Iterator[None]:
    """Record into ``tape`` (``replay=False``) or replay it from its start, for the block."""
    tape.replaying, tape.cursor = replay, 0
    tapes = active_tapes()
    tapes.append(tape)
    try:
        yield
    finally:
        tapes.remove(tape)


def taped(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``'s result, recorded on the active tape as ``(kind, key)``, or the tape's
    matching entry when replaying."""
    tapes = active_tapes()
    if not tapes:
        return compute()
    if tapes[-1].replaying:
        return tapes[-1].replay(kind, key)
    out = compute()
    tapes[-1].record(kind, key, out)
    return out
