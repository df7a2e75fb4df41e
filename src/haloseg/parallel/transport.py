"""Point-to-point messages over torch.distributed: posting, waiting, tags, small exchanges.

``post`` sends and receives a list of (peer, tensor, tag) at once, as independent messages on
gloo and as one group call on NCCL; ``gather_small`` and ``sum_small`` exchange statistics-
sized tensors as direct messages on small gloo groups. Tensors sent or received here must be
contiguous (gloo copies their storage as it is).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from haloseg.parallel.timing import timed

__all__ = ["gather_small", "p2p", "post", "sum_small", "tagged", "wait_all"]

Message = tuple[int, torch.Tensor, int]
"""(peer, tensor, tag): ``peer`` is a rank of the group, mapped to a global rank by ``peers``."""


def post(
    sends: Sequence[Message],
    recvs: Sequence[Message],
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


def p2p(
    sends: Sequence[Message],
    recvs: Sequence[Message],
    peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> None:
    """Post all sends and receives (peer, tensor, tag) at once, then wait for them."""
    for req in post(sends, recvs, peers, group):
        req.wait()


def tagged(pieces: Sequence[Any], rank: int) -> list[tuple[int, Any, int]]:
    """(position, piece, tag) for pieces from/to other ranks; tags count per peer in order.

    Both ends list a peer's pieces in the same order, so the n-th message between two ranks
    carries tag n and messages pair up without negotiation.
    """
    seen: dict[int, int] = defaultdict(int)
    out = []
    for i, piece in enumerate(pieces):
        if piece.peer == rank:
            continue
        out.append((i, piece, seen[piece.peer]))
        seen[piece.peer] += 1
    return out


_DIRECT_LIMIT = 16
"""Largest group whose small collectives go as direct messages to every peer."""

_SMALL_TAG = 1 << 20
"""Tag of the small direct messages, apart from the halo pieces' tags (0, 1, ...)."""


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
    p2p([(r, t, _SMALL_TAG) for r in others], [(r, parts[r], _SMALL_TAG) for r in others],
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
