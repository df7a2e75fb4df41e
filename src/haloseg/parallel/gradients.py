"""Parameter gradients summed over the spatial group at the end of every backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from haloseg.parallel.decomposition import Decomposition
from haloseg.parallel.timing import timed

__all__ = ["GradientSum"]


class GradientSum:
    """Sum parameter gradients over the spatial group at the end of every backward.

    Only the gradient of the current backward is summed (so gradient accumulation over
    several backwards stays right): tensor hooks take each incoming gradient and let
    autograd accumulate zeros in its place; one all-reduce of them all runs when the
    backward finishes, and the sum is added. Adding the sum itself (not the difference to
    the local part) keeps the replicated gradients, and so the weights, the same bits on
    every rank.
    """

    def __init__(self, params: list[nn.Parameter], dec: Decomposition) -> None:
        self.params, self.dec = params, dec
        self.pending: dict[int, torch.Tensor] = {}
        for i, p in enumerate(params):
            p.register_hook(self._keep(i))

    def _keep(self, i: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self.pending:
                torch.autograd.Variable._execution_engine.queue_callback(self._sum)
            self.pending[i] = grad
            return torch.zeros_like(grad)

        return hook

    def _sum(self) -> None:
        pending, self.pending = self.pending, {}
        local = [
            pending[i].reshape(-1) if i in pending else p.new_zeros(p.numel())
            for i, p in enumerate(self.params)
        ]
        # One more entry per parameter counts the ranks that had a gradient for it: one no
        # rank's forward used (a layer beside the features) keeps grad None, as in one
        # process, so optimizers skip it (AdamW's weight decay included).
        used = torch.tensor([float(i in pending) for i in range(len(self.params))])
        flat = torch.cat([*local, used.to(local[0])]) if local else used
        with timed("grads", group_wide=True):
            dist.all_reduce(flat, group=self.dec.group)
        offset = 0
        for i, p in enumerate(self.params):
            total = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if flat[-len(self.params) + i] == 0:
                continue
            if p.grad is None:
                p.grad = total.clone()
            else:
                p.grad += total
