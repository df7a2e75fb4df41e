"""``Decomposition``: a Cartesian grid of blocks over a process group, scatter and gather."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from haloseg.errors import DecompositionError
from haloseg.geometry import Box, boxes_from_bounds, grid_coords, grid_rank, split_extent
from haloseg.parallel.halo import box_slices
from haloseg.parallel.timing import timed
from haloseg.parallel.transport import gather_small

__all__ = ["Decomposition"]


class Decomposition:
    """Split every image's spatial dimensions over ``grid`` (one extent per spatial dim).

    Tensors are laid out ``(N, C, *spatial)``; rank ``r`` of ``group`` (row-major over the
    grid) owns one box of every tensor. ``bounds`` optionally fixes the image boundaries
    per axis (``[0, c1, ..., size]``), for uneven blocks of your choosing.
    """

    def __init__(
        self,
        grid: Sequence[int],
        group: dist.ProcessGroup | None = None,
        *,
        bounds: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.grid = tuple(int(g) for g in grid)
        if not self.grid or any(g < 1 for g in self.grid):
            raise DecompositionError(f"grid={grid} must be positive extents, e.g. (2, 2)")
        if not dist.is_available() or not dist.is_initialized():
            if math.prod(self.grid) != 1:
                raise DecompositionError(
                    f"grid {self.grid} needs {math.prod(self.grid)} processes but "
                    "torch.distributed is not initialised; launch with torchrun "
                    f"--nproc-per-node={math.prod(self.grid)}"
                )
            self.group, self.rank, self.peers = None, 0, (0,)
        else:
            self.group = group
            size = dist.get_world_size(group)
            if size != math.prod(self.grid):
                raise DecompositionError(
                    f"grid {self.grid} has {math.prod(self.grid)} blocks but the process group "
                    f"has {size} processes; use a grid whose extents multiply to {size}"
                )
            self.rank = dist.get_rank(group)
            self.peers = tuple(
                dist.get_global_rank(group, r) if group is not None else r for r in range(size)
            )
        self.coords = grid_coords(self.rank, self.grid)
        self.bounds = [list(b) for b in bounds] if bounds is not None else None
        if self.bounds is not None and [len(b) - 1 for b in self.bounds] != list(self.grid):
            raise DecompositionError(
                f"bounds give {[len(b) - 1 for b in self.bounds]} blocks per axis but the grid is "
                f"{self.grid}; give grid[d] + 1 boundaries for axis d"
            )
        self.align = 1
        """Block boundaries of the image are multiples of this (the network's down-sampling
        factor, set by ``spatial_parallel``)."""
        self.forward_id = 0
        self.forward_key: tuple | None = None
        """Global input layout of the running root forward: lets layers reuse their plans."""

    @property
    def size(self) -> int:
        return math.prod(self.grid)

    @property
    def spatial_dims(self) -> int:
        return len(self.grid)

    def image_bounds(self, shape: Sequence[int]) -> list[list[int]]:
        """Per-axis block boundaries of an image of spatial ``shape``."""
        if len(shape) != self.spatial_dims:
            raise DecompositionError(
                f"image has spatial shape {tuple(shape)} but the grid {self.grid} has "
                f"{self.spatial_dims} axes; give one grid extent per spatial dimension"
            )
        if self.bounds is not None:
            if [b[-1] for b in self.bounds] != list(shape):
                raise DecompositionError(
                    f"bounds cover {tuple(b[-1] for b in self.bounds)} but the image is "
                    f"{tuple(shape)}; give bounds ending at the image size"
                )
            return [list(b) for b in self.bounds]
        return [split_extent(n, g, self.align) for n, g in zip(shape, self.grid)]

    def boxes(self, shape: Sequence[int]) -> list[Box]:
        """Every rank's box of an image of spatial ``shape``."""
        return boxes_from_bounds(self.image_bounds(shape))

    def box(self, shape: Sequence[int]) -> Box:
        """This rank's box of an image of spatial ``shape``."""
        return self.boxes(shape)[self.rank]

    def scatter(self, x: torch.Tensor, *, like: torch.Tensor | None = None) -> torch.Tensor:
        """Whole tensor ``(N, C, *spatial)`` (present on every rank) -> this rank's block.

        Without ``like``, the block is this rank's box of ``x`` by the decomposition's bounds
        for ``x``'s shape: right for the network's input. ``like`` is this rank's block of a
        distributed tensor ``x`` is the whole of, e.g. the network's output when its global
        size differs from the input's (valid padding, size-changing layers): the boundaries
        then come from every rank's block size (``bounds_of``, one small all-gather that
        every rank of the group must join), so a target scattered ``like=y_local`` lines up
        with ``y_local`` cell for cell. Raises ``DecompositionError`` when those blocks do
        not add up to ``x``'s spatial shape.
        """
        if like is None:
            return x[box_slices(self.box(x.shape[2:]))].contiguous()
        if like.dim() != x.dim():
            raise DecompositionError(
                f"like has shape {tuple(like.shape)} but x has {x.dim() - 2} spatial "
                f"dimensions (shape {tuple(x.shape)}); give like with the same dimensions"
            )
        bounds = self.bounds_of(like.shape[2:])
        covered = tuple(b[-1] for b in bounds)
        if covered != tuple(x.shape[2:]):
            raise DecompositionError(
                f"the blocks of like (this rank's: {tuple(like.shape[2:])}) cover {covered} "
                f"but x has spatial shape {tuple(x.shape[2:])}; give the whole tensor whose "
                "blocks they are (the shape Decomposition.gather(like) returns)"
            )
        box = boxes_from_bounds(bounds)[self.rank]
        return x[box_slices(box)].contiguous()

    def bounds_of(self, local_shape: Sequence[int]) -> list[list[int]]:
        """Per-axis boundaries of a distributed tensor, from every rank's local spatial shape.

        One small all-gather over the group.
        """
        if self.size == 1:
            return [[0, int(n)] for n in local_shape]
        # NCCL moves only GPU tensors; gloo takes CPU tensors.
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        sizes = torch.tensor([list(local_shape)], dtype=torch.int64, device=device)
        with timed("shapes", group_wide=True):
            gathered = gather_small(sizes, self.rank, self.peers, self.group)
        table = torch.cat(gathered).tolist()
        bounds = []
        for d, g in enumerate(self.grid):
            along = [0] * self.spatial_dims
            edges = [0]
            for i in range(g):
                along[d] = i
                edges.append(edges[-1] + table[grid_rank(along, self.grid)][d])
            bounds.append(edges)
        for r, row in enumerate(table):
            c = grid_coords(r, self.grid)
            expect = [bounds[d][c[d] + 1] - bounds[d][c[d]] for d in range(self.spatial_dims)]
            if row != expect:
                raise DecompositionError(
                    f"rank {r} holds a block of spatial shape {tuple(row)} but the grid "
                    f"{self.grid} needs {tuple(expect)}; blocks must form a Cartesian grid "
                    "(use Decomposition.scatter)"
                )
        return bounds

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """Blocks ``(N, C, *block)`` of every rank -> the whole tensor, on every rank."""
        if self.size == 1:
            return y
        bounds = self.bounds_of(y.shape[2:])
        boxes = boxes_from_bounds(bounds)
        full = y.new_empty((*y.shape[:2], *(b[-1] for b in bounds)))
        largest = max(math.prod(hi - lo for lo, hi in box) for box in boxes)
        flat = y.new_zeros(y.shape[0] * y.shape[1] * largest)
        flat[: y.numel()] = y.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        with timed("gather", group_wide=True):
            dist.all_gather(parts, flat, group=self.group)
        for box, part in zip(boxes, parts, strict=True):
            shape = (*y.shape[:2], *(hi - lo for lo, hi in box))
            block = part[: math.prod(shape)].view(shape)
            full[box_slices(box)] = block
        return full
