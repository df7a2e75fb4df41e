"""Halo exchange over torch.distributed point-to-point messages, and its adjoint.

``exchange`` fills a rank's input window from its neighbours' blocks; ``return_halo_grads`` is
its adjoint: gradients of the halo cells travel back to their owners and are added there.
``HaloExchange`` binds the two into an ``autograd.Function``. Buffers are built by
``assemble`` (local copies only); geometry comes from ``haloseg.geometry.plan_exchange``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.errors import DecompositionError
from haloseg.geometry import Box, HaloPlan, to_local

# Under CUDA autocast, backward runs with the dtypes and autocast state of forward.
_amp_forward = torch.amp.custom_fwd(device_type="cuda")
_amp_backward = torch.amp.custom_bwd(device_type="cuda")


def autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A convolution's operands in the autocast dtype, when CUDA autocast is on.

    Autocast does not reach ``aten.convolution_backward``, which the custom backwards call:
    they must find the operands saved in the dtype the forward computed in.
    """
    if not x.is_cuda or not torch.is_autocast_enabled("cuda"):
        return x, weight, bias
    dtype = torch.get_autocast_dtype("cuda")
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


__all__ = [
    "HaloExchange",
    "Padding",
    "Tape",
    "assemble",
    "add_incoming",
    "assemble_adjoint",
    "box_slices",
    "comm_cpu_times",
    "comm_times",
    "exchange",
    "gather_small",
    "late_waits",
    "log_collectives",
    "reset_comm_times",
    "start_exchange",
    "start_halo_grads",
    "return_halo_grads",
    "save_halos",
    "saved_halos",
    "sum_small",
    "timed",
    "wait_all",
]

Padding = float | str
"""Out-of-image fill: a constant (0.0, -inf) or an ``F.pad`` mode ('reflect', 'replicate')."""

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


def _tapes() -> list[Tape]:
    if not hasattr(_STACK, "tapes"):
        _STACK.tapes = []
    return _STACK.tapes


@contextmanager
def taping(tape: Tape, *, replay: bool) -> Iterator[None]:
    """Record into ``tape`` (``replay=False``) or replay it from its start, for the block."""
    tape.replaying, tape.cursor = replay, 0
    tapes = _tapes()
    tapes.append(tape)
    try:
        yield
    finally:
        tapes.remove(tape)


def taped(kind: str, key: Any, compute: Any) -> Any:
    """``compute()``'s result, recorded on the active tape as ``(kind, key)``, or the tape's
    matching entry when replaying."""
    tapes = _tapes()
    if not tapes:
        return compute()
    if tapes[-1].replaying:
        return tapes[-1].replay(kind, key)
    out = compute()
    tapes[-1].record(kind, key, out)
    return out


def box_slices(box: Box) -> tuple[slice, ...]:
    """Index of ``box`` in a tensor laid out ``(N, C, *spatial)``."""
    return (slice(None), slice(None), *(slice(lo, hi) for lo, hi in box))


def _shape(x: torch.Tensor, box: Box) -> tuple[int, ...]:
    return (x.shape[0], x.shape[1], *(hi - lo for lo, hi in box))


def _post(
    sends: Sequence[tuple[int, torch.Tensor, int]],
    recvs: Sequence[tuple[int, torch.Tensor, int]],
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> list[Any]:
    """Post all sends and receives (peer, tensor, tag) at once; return their requests."""
    if not sends and not recvs:
        return []
    if dist.get_backend(group) == "gloo":
        # gloo: independent non-blocking messages (batching needs every rank of the group
        # to take part in the first batch, and a rank with nothing to exchange does not).
        works = [dist.isend(t, peers[p], group, tag) for p, t, tag in sends]
        return works + [dist.irecv(t, peers[p], group, tag) for p, t, tag in recvs]
    # NCCL: one group call, so that paired sends and receives cannot deadlock.
    ops = [dist.P2POp(dist.isend, t, peers[p], group, tag) for p, t, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peers[p], group, tag) for p, t, tag in recvs]
    return list(dist.batch_isend_irecv(ops))


def wait_all(requests: Sequence[Any], kind: str = "halo") -> None:
    """Wait for posted messages, counting the wait as communication of ``kind``."""
    if requests:
        with timed(kind):
            for req in requests:
                req.wait()


def _p2p(
    sends: Sequence[tuple[int, torch.Tensor, int]],
    recvs: Sequence[tuple[int, torch.Tensor, int]],
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> None:
    """Post all sends and receives (peer, tensor, tag) at once, then wait for them."""
    for req in _post(sends, recvs, peers, group):
        req.wait()


_DIRECT_LIMIT = 16
"""Largest group whose small collectives go as direct messages to every peer."""


def gather_small(
    t: torch.Tensor, rank: int, peers: Sequence[int], group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    """Every rank's ``t`` (small: statistics, sizes), in rank order, on every rank.

    Up to ``_DIRECT_LIMIT`` ranks on gloo, every rank messages every other directly: one hop,
    where gloo's ring collectives wait for their peers one after another, which costs a
    scheduler time slice per hop when ranks share cores.
    """
    if len(peers) > _DIRECT_LIMIT or dist.get_backend(group) != "gloo":
        parts = [torch.empty_like(t) for _ in peers]
        dist.all_gather(parts, t, group=group)
        return parts
    t = t.contiguous()
    parts = [t if r == rank else torch.empty_like(t) for r in range(len(peers))]
    others = [r for r in range(len(peers)) if r != rank]
    _p2p([(r, t, _SMALL_TAG) for r in others], [(r, parts[r], _SMALL_TAG) for r in others],
         peers, group)  # fmt: skip
    return parts


def sum_small(
    t: torch.Tensor, rank: int, peers: Sequence[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Sum of a small tensor over the group; the same bits on every rank (rank order)."""
    if len(peers) > _DIRECT_LIMIT or dist.get_backend(group) != "gloo":
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out
    return torch.stack(gather_small(t, rank, peers, group)).sum(0)


_SMALL_TAG = 1 << 20
"""Tag of the small direct messages, apart from the halo pieces' tags (0, 1, ...)."""


def _tagged(pieces: Sequence[Any], rank: int) -> list[tuple[int, Any, int]]:
    """(position, piece, tag) for pieces from/to other ranks; tags count per peer in order."""
    seen: dict[int, int] = defaultdict(int)
    out = []
    for i, piece in enumerate(pieces):
        if piece.peer == rank:
            continue
        out.append((i, piece, seen[piece.peer]))
        seen[piece.peer] += 1
    return out


def start_exchange(
    x: torch.Tensor,
    plan: HaloPlan,
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> tuple[list[torch.Tensor | None], list[Any]]:
    """Post this rank's halo messages; return the receive buffers (``None`` where the piece
    is its own data) and the requests to wait for before reading them.

    ``peers`` maps group ranks to global ranks. Only halo cells are copied: a send is the
    contiguous copy of a thin slab of ``x``, never the whole block.
    """
    tapes = _tapes()
    if tapes and tapes[-1].replaying:
        return tapes[-1].replay("halo", plan), []
    received: list[torch.Tensor | None] = [None] * len(plan.recv)
    if tapes:  # the buffers are filled in place when the requests complete
        tapes[-1].record("halo", plan, received)
    sends, recvs = [], []
    for _, piece, tag in _tagged(plan.send, plan.rank):
        sends.append((piece.peer, x[box_slices(piece.source)].contiguous(), tag))
    for i, piece, tag in _tagged(plan.recv, plan.rank):
        received[i] = x.new_empty(_shape(x, piece.buffer))
        recvs.append((piece.peer, received[i], tag))
    with timed("halo"):
        requests = _post(sends, recvs, peers, group)
    return received, requests


def exchange(
    x: torch.Tensor,
    plan: HaloPlan,
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor | None]:
    """This rank's halo pieces, received (``start_exchange`` and wait)."""
    received, requests = start_exchange(x, plan, peers, group)
    wait_all(requests)
    return received


def start_halo_grads(
    like: torch.Tensor,
    grad_pieces: Sequence[torch.Tensor | None],
    plan: HaloPlan,
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> tuple[list[tuple[Box, torch.Tensor]], list[Any]]:
    """Post the adjoint of ``exchange``: halo gradients go to their owners. Returns the
    incoming (box of this block, gradient) pairs to add once the requests are done."""
    sends, recvs = [], []
    for i, piece, tag in _tagged(plan.recv, plan.rank):
        sends.append((piece.peer, grad_pieces[i].contiguous(), tag))
    incoming = []
    for _, piece, tag in _tagged(plan.send, plan.rank):
        buf = like.new_empty(_shape(like, piece.source))
        incoming.append((piece.source, buf))
        recvs.append((piece.peer, buf, tag))
    with timed("halo"):
        requests = _post(sends, recvs, peers, group)
    return incoming, requests


def add_incoming(grad_x: torch.Tensor, incoming: Sequence[tuple[Box, torch.Tensor]]) -> None:
    for box, buf in incoming:
        grad_x[box_slices(box)] += buf


def return_halo_grads(
    grad_x: torch.Tensor,
    grad_pieces: Sequence[torch.Tensor | None],
    plan: HaloPlan,
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Adjoint of ``exchange``: send halo gradients to their owners, add what comes back."""
    incoming, requests = start_halo_grads(grad_x, grad_pieces, plan, peers, group)
    wait_all(requests)
    add_incoming(grad_x, incoming)
    return grad_x


def save_halos(
    ctx: Any, x: torch.Tensor, weight: torch.Tensor, received: Sequence[torch.Tensor | None]
) -> None:
    """Save the block, the weight and the received halo slabs (not a haloed window)."""
    ctx.own = [r is None for r in received]
    ctx.save_for_backward(x, weight, *(r for r in received if r is not None))


def saved_halos(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """What ``save_halos`` saved: block, weight, and the pieces (``None`` where own)."""
    x, weight, *halos = ctx.saved_tensors
    it = iter(halos)
    return x, weight, [None if own else next(it) for own in ctx.own]


def _core(plan: HaloPlan) -> Box:
    """The in-image part of the window, in window coordinates."""
    return tuple((lo, n - hi) for (lo, hi), n in zip(plan.pad, plan.shape, strict=True))


def _flat_pad(plan: HaloPlan) -> list[int]:
    return [v for lo_hi in reversed(plan.pad) for v in lo_hi]


def assemble(
    x: torch.Tensor,
    received: Sequence[torch.Tensor | None],
    plan: HaloPlan,
    padding: Padding,
) -> torch.Tensor:
    """The haloed window ``(N, C, *window)`` from the local block and the received pieces."""
    if plan.is_identity:
        return x
    if plan.is_view:
        return x[box_slices(plan.recv[0].source)]
    padded = any(lo or hi for lo, hi in plan.pad)
    if isinstance(padding, str) and padded:
        core = _core(plan)
        origin = tuple((lo, lo) for lo, _ in core)
        buf = x.new_empty(_shape(x, tuple((0, hi - lo) for lo, hi in core)))
        _fill(buf, x, received, plan, origin)
        return F.pad(buf, _flat_pad(plan), mode=padding)
    buf = x.new_empty(_shape(x, plan.window))
    if padded:
        _fill_padding(buf, plan, float(padding))
    _fill(buf, x, received, plan, None)
    return buf


def _fill_padding(buf: torch.Tensor, plan: HaloPlan, value: float) -> None:
    """Set the out-of-image slabs of the window (only those) to ``value``."""
    for d, (lo, hi) in enumerate(plan.pad):
        n = buf.shape[2 + d]
        for a, b in ((0, lo), (n - hi, n)):
            if b > a:
                buf.narrow(2 + d, a, b - a).fill_(value)


def _fill(
    buf: torch.Tensor,
    x: torch.Tensor,
    received: Sequence[torch.Tensor | None],
    plan: HaloPlan,
    origin: Box | None,
) -> None:
    for piece, data in zip(plan.recv, received, strict=True):
        box = piece.buffer if origin is None else to_local(piece.buffer, origin)
        buf[box_slices(box)] = x[box_slices(piece.source)] if data is None else data


def assemble_adjoint(
    grad_buf: torch.Tensor,
    x_shape: Sequence[int],
    plan: HaloPlan,
    padding: Padding,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Adjoint of ``assemble``: the gradient of the local block and of each received piece."""
    if plan.is_identity:
        return grad_buf, [None]
    if plan.is_view:
        grad_x = grad_buf.new_zeros(x_shape)
        grad_x[box_slices(plan.recv[0].source)] = grad_buf
        return grad_x, [None]
    origin = None
    if isinstance(padding, str) and any(lo or hi for lo, hi in plan.pad):
        core = _core(plan)
        origin = tuple((lo, lo) for lo, _ in core)
        dummy = grad_buf.new_zeros(_shape(grad_buf, tuple((0, hi - lo) for lo, hi in core)))
        dummy.requires_grad_(True)
        with torch.enable_grad():
            (grad_buf,) = torch.autograd.grad(
                F.pad(dummy, _flat_pad(plan), mode=padding), dummy, grad_buf
            )
    own = [p for p in plan.recv if p.peer == plan.rank]
    whole = tuple((0, n) for n in x_shape[2:])
    # The common case, one own piece covering the block: a copy, not zeros plus an add.
    first_copy = len(own) == 1 and own[0].source == whole
    grad_x = grad_buf.new_empty(x_shape) if first_copy else grad_buf.new_zeros(x_shape)
    grad_pieces: list[torch.Tensor | None] = []
    for piece in plan.recv:
        box = piece.buffer if origin is None else to_local(piece.buffer, origin)
        g = grad_buf[box_slices(box)]
        if piece.peer == plan.rank and first_copy:
            grad_x.copy_(g)
            grad_pieces.append(None)
        elif piece.peer == plan.rank:
            grad_x[box_slices(piece.source)] += g
            grad_pieces.append(None)
        else:
            grad_pieces.append(g)
    return grad_x, grad_pieces


class HaloExchange(torch.autograd.Function):
    """``x (N, C, *block) -> window (N, C, *window)``; backward adds halo gradients to owners."""

    @staticmethod
    @_amp_forward
    def forward(
        ctx: Any,
        x: torch.Tensor,
        plan: HaloPlan,
        padding: Padding,
        peers: Sequence[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.plan, ctx.padding, ctx.peers, ctx.group = plan, padding, peers, group
        ctx.x_shape = x.shape
        buf = assemble(x, exchange(x, plan, peers, group), plan, padding)
        return buf.clone() if buf is x else buf

    @staticmethod
    @_amp_backward
    def backward(ctx: Any, grad_buf: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_pieces = assemble_adjoint(grad_buf, ctx.x_shape, ctx.plan, ctx.padding)
        grad_x = return_halo_grads(grad_x, grad_pieces, ctx.plan, ctx.peers, ctx.group)
        return grad_x, None, None, None, None
