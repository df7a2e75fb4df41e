"""How ``haloseg infer`` runs one image: exact tiles for networks of local layers, or one
whole-image forward pass over a grid of processes for networks whose statistics span the
image (InstanceNorm, GroupNorm) — in one process only when it fits the memory budget — or,
on request, one whole-image pass in one process layer by layer over blocks."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from haloseg.errors import ConfigError, UnsupportedLayerError
from haloseg.geometry import Unsupported, layer_geometry
from haloseg.inference.budget import bytes_per_voxel, tile_for_budget
from haloseg.inference.receptive import ReceptiveField, receptive_field
from haloseg.inference.tiles import aligned_tile
from haloseg.inference.whole import auto_grid, block_chunks, whole_image_bytes
from haloseg.layerwise.budget import block_for_budget
from haloseg.parallel import Decomposition
from haloseg.parallel.alignment import downsampling_factor
from haloseg.resident import resident_kib
from haloseg.training.samples import padded_shape
from haloseg.training.spec import RunSpec
from haloseg.units import format_bytes

__all__ = ["Plan", "plan_image"]

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """How one image is predicted: tiles (``rf``, ``core``), whole-image blocks over
    processes (``dec``), or one whole-image pass layer by layer over ``block``s."""

    chunks: tuple[int, ...]
    rf: ReceptiveField | None = None
    core: tuple[int, ...] | None = None
    dec: Decomposition | None = None
    block: tuple[int, ...] | None = None
    align: int = 1


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the default budget of a whole-image forward)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _plan_whole(
    model: nn.Module,
    spec: RunSpec,
    spatial: tuple[int, ...],
    grid: Sequence[int] | None,
    world: int,
    max_memory: int | None,
    reason: str,
) -> Plan:
    """Whole-image blocks over ``grid`` (chosen from the processes if None); one process
    only when the forward pass fits the budget, else an error naming the command that does."""
    if grid is not None and len(grid) != len(spatial):
        raise ConfigError(
            f"--grid {' '.join(map(str, grid))} has {len(grid)} extents but the image is "
            f"{len(spatial)}-D; give one extent per spatial axis"
        )
    grid = tuple(grid) if grid is not None else auto_grid(spatial, world)
    if math.prod(grid) != world:
        raise ConfigError(
            f"--grid {' '.join(map(str, grid))} has {math.prod(grid)} blocks but {world} "
            f"process(es) run; launch with torchrun --nproc-per-node {math.prod(grid)}"
        )
    if world == 1:
        _check_whole_fits(model, spec, spatial, max_memory, reason)
    dec = Decomposition(grid)
    dec.align = downsampling_factor(model, len(spatial))
    return Plan(chunks=block_chunks(dec, spatial), dec=dec)


def _check_whole_fits(
    model: nn.Module, spec: RunSpec, spatial: tuple[int, ...], max_memory: int | None,
    reason: str,
) -> None:  # fmt: skip
    align = downsampling_factor(model, len(spatial))
    # At least 2 voxels per side at the coarsest level: InstanceNorm refuses 1.
    probe = max(2 * align, min(4 * align, 64))
    per_voxel = bytes_per_voxel(model, len(spatial), spec.in_channels, probe)
    need = whole_image_bytes(per_voxel, spatial, align, spec.in_channels)
    budget = max_memory if max_memory is not None else _available_bytes()
    if need <= budget:
        return
    n = 2 ** math.ceil(math.log2(need / max(budget, 1)))
    grid = " ".join(map(str, auto_grid(spatial, n)))
    raise ConfigError(
        f"{reason}, so it runs as one whole-image forward pass, which needs about "
        f"{format_bytes(need)} for {'x'.join(map(str, spatial))} but the budget is "
        f"{format_bytes(budget)}; split the image over processes: torchrun "
        f"--nproc-per-node {n} -m haloseg infer ... --grid {grid}; or run it layer by layer "
        "in this process: --executor layerwise"
    )


def plan_image(
    model: nn.Module,
    spec: RunSpec,
    spatial: tuple[int, ...],
    *,
    tile: Sequence[int] | None,
    grid: Sequence[int] | None,
    max_memory: int | None,
    batch_size: int,
    world: int,
    executor: str = "auto",
    block: Sequence[int] | None = None,
) -> Plan:
    """Tiles of ``tile`` (or from the ``max_memory`` budget) for a network of local layers;
    a whole-image forward over ``grid`` for one whose statistics span the image, or when
    ``grid`` is given; with ``executor="layerwise"``, one whole-image forward in this process
    over blocks of ``block`` (or the largest within ``max_memory`` of device memory)."""
    dims = spec.spatial_dims
    if executor == "layerwise":
        return _plan_layerwise(model, spec, spatial, tile, grid, block, max_memory, world)
    if block is not None:
        raise ConfigError("--block sets the blocks of --executor layerwise; add that flag")
    try:
        rf = receptive_field(model, dims)
    except UnsupportedLayerError as e:
        if not _global_statistics(model, dims):
            raise
        if tile is not None:
            log.warning("--tile %s is not used: %s, so the image runs whole", tile, _first(e))
        return _plan_whole(model, spec, spatial, grid, world, max_memory, _first(e))
    if grid is not None:
        return _plan_whole(model, spec, spatial, grid, world, max_memory, "--grid was given")
    if tile is None:
        if max_memory is None:
            raise ConfigError("give --tile or --max-memory (e.g. --max-memory 2GB)")
        # The budget covers the whole process: what is resident already is spent.
        budget = max_memory - (resident_kib() or 0) * 1024 - _model_bytes(model)
        tile = tile_for_budget(model, rf, dims, spec.in_channels, spec.model["out_channels"],
                               budget, batch_size=batch_size)  # fmt: skip
    elif len(tile) == 1:
        tile = tuple(tile) * dims
    core = aligned_tile(tile, rf.alignment)
    return Plan(chunks=core, rf=rf, core=core)


def _plan_layerwise(
    model: nn.Module, spec: RunSpec, spatial: tuple[int, ...], tile: Sequence[int] | None,
    grid: Sequence[int] | None, block: Sequence[int] | None, max_memory: int | None,
    world: int,
) -> Plan:  # fmt: skip
    """One whole-image pass over blocks, in one process, padded as the whole-image path pads."""
    dims = spec.spatial_dims
    for flag, value in (("--tile", tile), ("--grid", grid)):
        if value is not None:
            raise ConfigError(f"{flag} does not apply to --executor layerwise; drop it or "
                              "give --block")  # fmt: skip
    if world > 1:
        raise ConfigError(
            f"--executor layerwise runs in one process but {world} run; launch without "
            "torchrun, or drop --executor layerwise to split the image over the processes"
        )
    align = downsampling_factor(model, dims)
    padded = padded_shape(spatial, align, (1,) * dims)
    if block is None:
        if max_memory is None:
            raise ConfigError("give --block or --max-memory (the device budget, e.g. 2GB)")
        dtype = next(model.parameters()).dtype
        shape = (1, spec.in_channels, *padded)
        block = block_for_budget(model, shape, dtype, max_memory, align=align)
    elif len(block) == 1:
        block = tuple(block) * dims
    if len(block) != dims or min(block) < 1:
        raise ConfigError(
            f"--block {' '.join(map(str, block))} must be one size >= 1 or {dims} of them "
            "(one per spatial axis)"
        )
    chunks = tuple(min(b, n) for b, n in zip(block, spatial))
    return Plan(chunks=chunks, block=tuple(block), align=align)


def _global_statistics(model: nn.Module, spatial_dims: int) -> bool:
    """Whether ``model`` has a layer whose geometry needs statistics over the whole image."""

    def needs(m: nn.Module) -> bool:
        try:
            return layer_geometry(m, spatial_dims).kind == "global"
        except Unsupported:
            return False

    return any(needs(m) for m in model.modules())


def _first(e: Exception) -> str:
    return str(e).split(";")[0]


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
