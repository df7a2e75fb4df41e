"""Halo exchange over point-to-point messages, and its adjoint.

``exchange`` fills a rank's input window from its neighbours' blocks; ``return_halo_grads`` is
its adjoint: gradients of the halo cells travel back to their owners and are added there.
``HaloExchange`` binds the two into an ``autograd.Function``. Buffers are built by
``assemble`` (local copies only); geometry comes from ``haloseg.geometry.plan_exchange``.

Windows and gradients keep the block's memory format (``torch.channels_last`` and
``channels_last_3d`` included); the messages themselves are always contiguous tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.geometry import Box, HaloPlan, to_local
from haloseg.parallel.amp import amp_backward, amp_forward
from haloseg.parallel.tape import active_tapes
from haloseg.parallel.timing import timed
from haloseg.parallel.transport import post, tagged, wait_all

__all__ = [
    "HaloExchange",
    "Padding",
    "add_incoming",
    "assemble",
    "assemble_adjoint",
    "box_slices",
    "exchange",
    "memory_format_of",
    "return_halo_grads",
    "save_halos",
    "saved_halos",
    "start_exchange",
    "start_halo_grads",
]

Padding = float | str
"""Out-of-image fill: a constant (0.0, -inf) or an ``F.pad`` mode ('reflect', 'replicate')."""


def box_slices(box: Box) -> tuple[slice, ...]:
    """Index of ``box`` in a tensor laid out ``(N, C, *spatial)``."""
    return (slice(None), slice(None), *(slice(lo, hi) for lo, hi in box))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` (4-D) or ``channels_last_3d`` (5-D) when ``t`` is laid out so
    and not also plainly contiguous (one channel, one pixel); else ``torch.contiguous_format``."""
    if t.is_contiguous():
        return torch.contiguous_format
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dims and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _shape(x: torch.Tensor, box: Box) -> tuple[int, ...]:
    return (x.shape[0], x.shape[1], *(hi - lo for lo, hi in box))


def _message(like: torch.Tensor, box: Box) -> torch.Tensor:
    """A receive buffer for ``box`` of ``like``: contiguous whatever ``like``'s format."""
    return torch.empty(_shape(like, box), dtype=like.dtype, device=like.device)


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
    tapes = active_tapes()
    if tapes and tapes[-1].replaying:
        return tapes[-1].replay("halo", plan), []
    received: list[torch.Tensor | None] = [None] * len(plan.recv)
    if tapes:  # the buffers are filled in place when the requests complete
        tapes[-1].record("halo", plan, received)
    sends, recvs = [], []
    for _, piece, tag in tagged(plan.send, plan.rank):
        sends.append((piece.peer, x[box_slices(piece.source)].contiguous(), tag))
    for i, piece, tag in tagged(plan.recv, plan.rank):
        received[i] = _message(x, piece.buffer)
        recvs.append((piece.peer, received[i], tag))
    with timed("halo"):
        requests = post(sends, recvs, peers, group)
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
    for i, piece, tag in tagged(plan.recv, plan.rank):
        sends.append((piece.peer, grad_pieces[i].contiguous(), tag))
    incoming = []
    for _, piece, tag in tagged(plan.send, plan.rank):
        buf = _message(like, piece.source)
        incoming.append((piece.source, buf))
        recvs.append((piece.peer, buf, tag))
    with timed("halo"):
        requests = post(sends, recvs, peers, group)
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
    """The haloed window ``(N, C, *window)`` from the local block and the received pieces,
    in the block's memory format."""
    if plan.is_identity:
        return x
    if plan.is_view:
        return x[box_slices(plan.recv[0].source)]
    fmt = memory_format_of(x)
    padded = any(lo or hi for lo, hi in plan.pad)
    if isinstance(padding, str) and padded:
        core = _core(plan)
        origin = tuple((lo, lo) for lo, _ in core)
        shape = _shape(x, tuple((0, hi - lo) for lo, hi in core))
        buf = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        _fill(buf, x, received, plan, origin)
        # ``contiguous`` copies only when F.pad left another layout.
        return F.pad(buf, _flat_pad(plan), mode=padding).contiguous(memory_format=fmt)
    buf = torch.empty(_shape(x, plan.window), dtype=x.dtype, device=x.device, memory_format=fmt)
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
    memory_format: torch.memory_format | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Adjoint of ``assemble``: the gradient of the local block and of each received piece.

    The block's gradient is in ``memory_format`` (the block's; by default ``grad_buf``'s).
    """
    fmt = memory_format_of(grad_buf) if memory_format is None else memory_format
    if plan.is_identity:
        return grad_buf.contiguous(memory_format=fmt), [None]
    like = {"dtype": grad_buf.dtype, "device": grad_buf.device, "memory_format": fmt}
    if plan.is_view:
        grad_x = torch.empty(x_shape, **like).zero_()
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
    grad_x = torch.empty(x_shape, **like)  # torch.zeros takes no memory format
    if not first_copy:
        grad_x.zero_()
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
    """``x (N, C, *block) -> window (N, C, *window)``; backward adds halo gradients to owners.

    The window and the block's gradient are in ``x``'s memory format."""

    @staticmethod
    @amp_forward
    def forward(
        ctx: Any,
        x: torch.Tensor,
        plan: HaloPlan,
        padding: Padding,
        peers: Sequence[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.plan, ctx.padding, ctx.peers, ctx.group = plan, padding, peers, group
        ctx.x_shape, ctx.memory_format = x.shape, memory_format_of(x)
        buf = assemble(x, exchange(x, plan, peers, group), plan, padding)
        return buf.clone() if buf is x else buf

    @staticmethod
    @amp_backward
    def backward(ctx: Any, grad_buf: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_pieces = assemble_adjoint(
            grad_buf, ctx.x_shape, ctx.plan, ctx.padding, ctx.memory_format
        )
        grad_x = return_halo_grads(grad_x, grad_pieces, ctx.plan, ctx.peers, ctx.group)
        return grad_x, None, None, None, None
