"""``haloseg demo``: a U-Net split over a 2x2 grid of processes gives single-process numbers."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.models import unet_preset
from haloseg.parallel import Decomposition, cross_entropy, spatial_parallel
from haloseg.parallel.comm import comm_times, reset_comm_times
from haloseg.parallel.spawn import run_distributed

__all__ = ["run_demo"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _demo_worker(size: int, grid: tuple[int, int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = unet_preset("small", spatial_dims=2, in_channels=1, out_channels=2).double()
    ref = copy.deepcopy(model)
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    target = (x[:, 0] > 0.5).long()
    xr = x.clone().requires_grad_()
    start = time.perf_counter()
    F.cross_entropy(ref(xr), target).backward()
    single_s = time.perf_counter() - start

    dec = Decomposition(grid)
    net = spatial_parallel(model, dec)
    xl = dec.scatter(x).requires_grad_()
    dist.barrier()
    reset_comm_times()
    start = time.perf_counter()
    yl = net(xl)
    loss = cross_entropy(yl, dec.scatter(target[:, None])[:, 0], dec)
    loss.backward()
    parallel_s = time.perf_counter() - start
    grads = [_relative(p.grad, q.grad) for p, q in zip(net.parameters(), ref.parameters())]
    return {
        "block": tuple(xl.shape[2:]),
        "output": _relative(dec.gather(yl.detach()), ref(x).detach()),
        "input_grad": _relative(dec.gather(xl.grad), xr.grad),
        "param_grad": max(grads),
        "single_s": single_s,
        "parallel_s": parallel_s,
        "comm_s": sum(comm_times().values()),
    }


def run_demo(size: int = 256, grid: tuple[int, int] = (2, 2)) -> list[dict[str, Any]]:
    """Train-step a small 2-D U-Net on ``grid`` processes and against one; return per rank."""
    return run_distributed(_demo_worker, grid[0] * grid[1], size, grid, timeout=900)
