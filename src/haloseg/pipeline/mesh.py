"""Processes as pipeline stages x data replicas x a spatial grid, on one ``DeviceMesh``.

The mesh's axes are ``("pipe", "data", "space")``, rank ``(p * data + d) * space + s``: the
ranks of one spatial group are consecutive (the halo traffic stays within a node), and the
stages are the outermost axis (only a stage's boundary tuple crosses between them). Besides
the mesh's own groups, a stage's data x space ranks form the group over which its gradients
are summed and its BatchNorm statistics gathered, and a replica's stages x space ranks the
group that reads the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from haloseg.errors import DecompositionError
from haloseg.parallel.decomposition import Decomposition

__all__ = ["PipelineLayout", "check_processes", "pipeline_layout"]


@dataclass(frozen=True)
class PipelineLayout:
    """Where this process sits: stage ``stage`` of ``stages``, replica ``data_rank`` of
    ``data_size``, and the spatial block ``dec`` assigns it."""

    stage: int
    stages: int
    data_rank: int
    data_size: int
    dec: Decomposition
    mesh: DeviceMesh
    pipe_group: dist.ProcessGroup
    """One rank per stage, all with this rank's (data, space) coordinates; group rank =
    stage. Activations and their gradients go between its ranks."""
    stage_group: dist.ProcessGroup
    """This stage's data x space ranks: its parameter gradients are summed over them, its
    BatchNorm statistics gathered from them."""
    replica_group: dist.ProcessGroup
    """This replica's stages x space ranks: they all read the same images."""

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def stage_rank(self, stage: int) -> int:
        """The global rank of ``stage`` in this rank's pipe group."""
        return dist.get_global_rank(self.pipe_group, stage)


def check_processes(stages: int, data: int, grid: Sequence[int], world: int) -> None:
    """Refuse a launch whose process count is not ``stages x data x prod(grid)``."""
    need = stages * data * math.prod(grid)
    if need != world:
        raise DecompositionError(
            f"parallel.pipeline={stages} x parallel.data={data} x grid {list(grid)} = {need} "
            f"processes, but {world} were launched; launch with torchrun "
            f"--nproc-per-node={need} or change parallel.pipeline, parallel.data or parallel.grid"
        )


def _subgroup(rank_lists: list[list[int]]) -> dist.ProcessGroup:
    """This rank's group of ``rank_lists`` (every rank creates every group, in order)."""
    mine, _ = dist.new_subgroups_by_enumeration(rank_lists)
    return mine


def pipeline_layout(
    stages: int, *, data: int = 1, grid: Sequence[int] = (1,), device_type: str = "cpu"
) -> PipelineLayout:
    """Arrange the initialised process group as ``stages`` x ``data`` x ``grid`` (every rank
    calls it, at the same time; the default grid splits nothing, in any number of dims).
    Raises ``DecompositionError`` when the counts do not multiply to the world size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise DecompositionError(
            f"a pipeline of {stages} stages needs torch.distributed initialised; launch with "
            f"torchrun --nproc-per-node={stages * data * math.prod(grid)}"
        )
    world = dist.get_world_size()
    check_processes(stages, data, grid, world)
    space = math.prod(grid)
    mesh = init_device_mesh(device_type, (stages, data, space),
                            mesh_dim_names=("pipe", "data", "space"))  # fmt: skip
    per_stage = data * space
    stage_group = _subgroup([list(range(p * per_stage, (p + 1) * per_stage))
                             for p in range(stages)])  # fmt: skip
    replica_group = _subgroup([[(p * data + d) * space + s for p in range(stages)
                                for s in range(space)] for d in range(data)])  # fmt: skip
    return PipelineLayout(
        stage=mesh.get_local_rank("pipe"), stages=stages,
        data_rank=mesh.get_local_rank("data"), data_size=data,
        dec=Decomposition(grid, group=mesh.get_group("space")), mesh=mesh,
        pipe_group=mesh.get_group("pipe"), stage_group=stage_group, replica_group=replica_group,
    )  # fmt: skip
