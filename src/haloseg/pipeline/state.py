"""The whole network's state from its stages: every rank ends with every stage's parameters,
buffers and optimizer state, under the network's own names.

Each rank holds the whole network but trains only its stage's part of it; the other parts
keep what they were when last gathered. Gathering over the pipe group (one rank per stage)
makes every rank's copy current, so a checkpoint written by rank 0 holds the full state dict
under the network's parameter names (``haloseg infer`` serves it unchanged), and a forward of
the whole network on any rank (previews) uses the trained weights.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist

from haloseg.pipeline.runner import Pipeline

__all__ = ["gather_stages"]


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def _owned(pipe: Pipeline, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """This stage's entries of the network's state dict and of the optimizer's state."""
    mine = {id(t) for t in itertools.chain(pipe.stage.parameters(), pipe.stage.buffers())}
    weights = {k: _cpu(v) for k, v in pipe.model.state_dict(keep_vars=True).items()
               if id(v) in mine}  # fmt: skip
    if optimizer is None:
        return weights, {}
    state = optimizer.state_dict()["state"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return weights, {i: _cpu(state[i]) for i, p in enumerate(params)
                     if id(p) in mine and i in state}  # fmt: skip


def gather_stages(pipe: Pipeline, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load every stage's current weights, buffers and (with ``optimizer``, built over the
    network's parameters) optimizer state on every rank. Every rank calls it."""
    mine = _owned(pipe, optimizer)
    parts: list[Any] = [None] * pipe.layout.stages
    dist.all_gather_object(parts, mine, group=pipe.layout.pipe_group)
    weights = pipe.model.state_dict()
    for stage_weights, _ in parts:
        weights.update(stage_weights)
    pipe.model.load_state_dict(weights)
    if optimizer is not None:
        state = optimizer.state_dict()
        for _, stage_state in parts:
            state["state"].update(stage_state)
        optimizer.load_state_dict(state)
