"""Time spent communicating, by kind, and logs of group-wide calls to tell late ranks apart.

``timed`` adds a block's wall and CPU time to a kind of communication ('halo', 'norm',
'reduce', ...); ``log_collectives`` records when each group-wide call began and ended, and
``late_waits`` splits those calls into waiting for a late rank and the messages themselves.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = [
    "comm_cpu_times",
    "comm_times",
    "late_waits",
    "log_collectives",
    "reset_comm_times",
    "timed",
]

_TIMES: dict[str, float] = defaultdict(float)
_CPU: dict[str, float] = defaultdict(float)
_COLLECTIVES: list[tuple[str, float, float]] | None = None
"""While ``log_collectives`` runs: (kind, start, end) of each group-wide call, in order."""


@contextmanager
def timed(kind: str, *, group_wide: bool = False) -> Iterator[None]:
    """Add the wall time (and the process CPU time) of the block to communication ``kind``.

    ``group_wide``: the block is a call every rank of the group makes in the same order
    (statistics, reductions), which ``log_collectives`` records.
    """
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        end = time.perf_counter()
        _TIMES[kind] += end - start
        _CPU[kind] += time.process_time() - cpu
        if group_wide and _COLLECTIVES is not None:
            _COLLECTIVES.append((kind, start, end))


@contextmanager
def log_collectives() -> Iterator[list[tuple[str, float, float]]]:
    """Record ``(kind, start, end)`` (``time.perf_counter``) of every group-wide call in the
    block, in call order: with the other ranks' logs, ``late_waits`` tells waiting for a
    rank that arrived later from the messages themselves.

    One log per process at a time (calls from autograd's thread go to it too). Meant for
    gloo, whose collectives return when done; NCCL's return when launched, so the waiting
    would show up later, outside the calls.
    """
    global _COLLECTIVES
    if _COLLECTIVES is not None:
        raise RuntimeError("log_collectives is already recording in this process")
    log: list[tuple[str, float, float]] = []
    _COLLECTIVES = log
    try:
        yield log
    finally:
        _COLLECTIVES = None


def late_waits(logs: Sequence[Sequence[tuple[str, float, float]]]) -> list[float]:
    """Per rank, the seconds spent in group-wide calls before the last rank arrived.

    ``logs`` holds the ``log_collectives`` records of the same calls by every rank of one
    group, on one clock (ranks on one machine). A rank that reaches a collective first waits
    there for the slowest: that is load imbalance, not the cost of the messages, which is
    the rest of the call (from the last arrival to the end).
    """
    if not logs:
        return []
    calls = [kind for kind, _, _ in logs[0]]
    for r, log in enumerate(logs):
        kinds = [kind for kind, _, _ in log]
        if kinds != calls:
            i = next((i for i, (a, b) in enumerate(zip(kinds, calls)) if a != b),
                     min(len(kinds), len(calls)))  # fmt: skip
            raise ValueError(
                f"rank {r} logged {len(kinds)} group-wide calls and rank 0 {len(calls)}, "
                f"differing from call {i} on; the logs must cover the same calls"
            )
    waits = [0.0] * len(logs)
    for i in range(len(calls)):
        last = max(log[i][1] for log in logs)
        for r, log in enumerate(logs):
            _, start, end = log[i]
            waits[r] += max(0.0, min(last, end) - start)
    return waits


def comm_times() -> dict[str, float]:
    """Wall seconds spent in each kind of communication since the last reset (waiting for
    peers included)."""
    return dict(_TIMES)


def comm_cpu_times() -> dict[str, float]:
    """Process CPU seconds spent in each kind of communication since the last reset (the
    cost of the messages themselves: copies, system calls, gloo's threads)."""
    return dict(_CPU)


def reset_comm_times() -> None:
    _TIMES.clear()
    _CPU.clear()
