"""Data parallelism over samples composed with spatial decomposition (a data x space mesh)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from haloseg.errors import DecompositionError
from haloseg.parallel.decomposition import Decomposition

__all__ = ["data_parallel", "data_space_mesh", "space_decomposition"]


def data_space_mesh(data: int, grid: Sequence[int], device: str = "cpu") -> DeviceMesh:
    """A 2-D ``DeviceMesh`` named ``("data", "space")``: ``data`` replicas x ``prod(grid)``
    spatial blocks. Ranks of one spatial group are consecutive."""
    space = math.prod(grid)
    if dist.get_world_size() != data * space:
        raise DecompositionError(
            f"data={data} x grid {tuple(grid)} = {data * space} processes, but the world has "
            f"{dist.get_world_size()}; launch with --nproc-per-node={data * space}"
        )
    return init_device_mesh(device, (data, space), mesh_dim_names=("data", "space"))


def _mean_over_data(state: int, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # One all-reduce over all ranks, divided by the data extent only: a sum over the spatial
    # blocks (each holds part of the image's gradient) and a mean over the data replicas.
    t = bucket.buffer().div_(state)
    fut = dist.all_reduce(t, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks the hook's annotations as objects, not the strings postponed evaluation leaves.
_mean_over_data.__annotations__.update(
    bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
)


def data_parallel(model: nn.Module, mesh: DeviceMesh, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a model converted with ``spatial_parallel(..., sync_gradients=False)`` in DDP,
    or a plain one whose ranks each run it on an overlapping tile of the image.

    Gradients end up summed over the ``space`` axis and averaged over the ``data`` axis, so
    one optimizer step equals the single-process step on the whole batch. BatchNorm takes
    its batch statistics over every replica's images (as ``SyncBatchNorm`` would), so the
    forward pass and the running statistics equal the single process's too.
    """
    if mesh.size() != dist.get_world_size():
        raise DecompositionError(
            f"the mesh holds {mesh.size()} of the {dist.get_world_size()} processes; "
            "data_parallel needs a mesh over all of them"
        )
    stats = Decomposition((mesh.size(),))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "_hs"):
            m._hs.stats = stats
    ddp = DistributedDataParallel(model, broadcast_buffers=False, **ddp_kwargs)
    ddp.register_comm_hook(mesh.size(0), _mean_over_data)
    return ddp


def space_decomposition(mesh: DeviceMesh, grid: Sequence[int]) -> Decomposition:
    """The ``Decomposition`` of this rank's spatial group of ``mesh``."""
    return Decomposition(grid, group=mesh.get_group("space"))
