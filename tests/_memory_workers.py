"""Workers for the multi-process memory tests (importable by spawned processes)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import haloseg
from haloseg.memory.checkpoint import checkpoint_levels
from haloseg.parallel import halo, transport


def _unet(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return haloseg.UNet(
        spatial_dims=2, in_channels=2, out_channels=3, depth=2, base_channels=4, norm=norm,
        upsampling="linear",
    ).double()  # fmt: skip


def _count_messages() -> list[int]:
    """Wrap transport.post so that every posted message (halos in halo.py, small exchanges
    in transport.py) is counted."""
    counts = [0]
    post = transport.post

    def counting(sends, recvs, peers, group):  # noqa: ANN001, ANN202
        counts[0] += len(sends) + len(recvs)
        return post(sends, recvs, peers, group)

    # halo.py holds its own reference to the function (``from ... import post``).
    transport.post = halo.post = counting
    return counts


def checkpoint_worker(grid: tuple[int, ...], norm: str) -> dict[str, object]:
    """Spatial blocks with and without checkpointing, and one process, over two SGD steps."""
    ref = _unet(norm)
    plain = haloseg.spatial_parallel(copy.deepcopy(ref), haloseg.Decomposition(grid))
    ckpt = haloseg.spatial_parallel(copy.deepcopy(ref), haloseg.Decomposition(grid))
    checkpoint_levels(ckpt)
    models = {"ref": ref, "plain": plain, "ckpt": ckpt}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    counts = _count_messages()
    out: dict[str, object] = {"messages": {}}
    torch.manual_seed(1)
    for step in range(2):
        x = torch.randn(2, 2, 32, 48, dtype=torch.float64)
        w = torch.randn(2, 3, 32, 48, dtype=torch.float64)
        grads, ys = {}, {}
        for key, m in models.items():
            dec = haloseg.Decomposition(grid) if key != "ref" else None
            xi = (dec.scatter(x) if dec else x.clone()).requires_grad_()
            wi = dec.scatter(w) if dec else w
            y = m(xi)
            before = counts[0]
            loss = (y * wi).sum()
            loss = haloseg.global_sum(loss, m._hs_dec) if dec else loss
            loss.backward()
            out["messages"][(key, step)] = counts[0] - before
            ys[key] = dec.gather(y.detach()) if dec else y.detach()
            grads[key] = dec.gather(xi.grad) if dec else xi.grad
            opts[key].step()
            opts[key].zero_grad()
        out[f"y{step}"] = {k: v for k, v in ys.items()}
        out[f"gx{step}"] = grads
    out["weights"] = {k: [p.detach().clone() for p in m.parameters()] for k, m in models.items()}
    out["buffers"] = {k: [b.clone() for b in m.buffers()] for k, m in models.items()}
    # A retained graph: the second backward recomputes again, still without new messages.
    x = torch.randn(2, 2, 32, 48, dtype=torch.float64)
    for key in ("plain", "ckpt"):
        m = models[key]
        loss = haloseg.global_sum(m(m._hs_dec.scatter(x)).sum(), m._hs_dec)
        before = counts[0]
        loss.backward(retain_graph=True)
        loss.backward()
        out["messages"][(key, "retained")] = counts[0] - before
        out[f"retained_{key}"] = [p.grad.clone() for p in m.parameters()]
        opts[key].zero_grad()
    # Tensors cross the process boundary through shared memory that dies with the worker.
    return torch.utils._pytree.tree_map(
        lambda v: v.numpy() if isinstance(v, torch.Tensor) else v, out
    )
