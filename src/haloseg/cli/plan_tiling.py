"""``haloseg plan``: overlapping tiles against halo exchange at each device count (redundancy
E, memory per device, the choice), and the tiles of ``haloseg train --plan`` in tiles mode."""

from __future__ import annotations

import argparse
import math

from rich.console import Console
from rich.table import Table

from haloseg.config import RunConfig
from haloseg.errors import ConfigError
from haloseg.memory.model import StepSpec
from haloseg.memory.planner import HEADROOM
from haloseg.memory.tiling import TILES_MAX_REDUNDANCY, compare_tiling, tile_spec, tiles
from haloseg.units import GIB

__all__ = ["add_tiling_args", "plan_tiling", "tiles_run_spec"]

DEVICE_COUNTS = (2, 4, 8, 16, 32, 64)


def _devices(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device count >= 2 (tiles of one "
                                         "image need at least two)")  # fmt: skip
    return int(text)


def _redundancy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a redundancy E >= 1, like 1.25")
    return value


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    counts = ", ".join(map(str, DEVICE_COUNTS))
    p.add_argument("--devices", type=_devices, help="compare overlapping tiles with halo exchange "
                   f"at this device count (default: {counts})")  # fmt: skip
    p.add_argument("--freeze-norm", action="store_true", help="BatchNorm frozen "
                   "(train.freeze_norm), so the network can train on tiles")  # fmt: skip
    p.add_argument("--max-redundancy", type=_redundancy, default=TILES_MAX_REDUNDANCY,
                   help="largest E (tile voxels / image voxels) at which tiles are chosen; "
                   "raise it where halo exchange is slow (between machines)")  # fmt: skip


def _halo(spec: StepSpec, freeze_norm: bool) -> tuple[tuple[int, ...], str | None]:
    """(receptive-field halo per dim, why tiles cannot train the network or None) of the
    haloseg U-Net of ``spec`` in training mode."""
    import torch

    from haloseg.inference.receptive import receptive_field
    from haloseg.models import UNet
    from haloseg.training.freeze import freeze_batch_norm
    from haloseg.training.tiles import local_receptive_field

    with torch.device("meta"):
        model = UNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                     out_channels=spec.classes, depth=spec.depth,
                     base_channels=spec.channels[0], convs_per_level=spec.convs_per_level,
                     norm=spec.norm, upsampling=spec.upsampling)  # fmt: skip
    if freeze_norm:
        freeze_batch_norm(model)
    try:
        return local_receptive_field(model.train(), spec.spatial_dims).halo, None
    except ConfigError as e:
        # The halo the same network would need without its statistics over the image.
        plain = UNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                     out_channels=spec.classes, depth=spec.depth,
                     base_channels=spec.channels[0], convs_per_level=spec.convs_per_level,
                     norm="none", upsampling=spec.upsampling).to("meta")  # fmt: skip
        return receptive_field(plain, spec.spatial_dims).halo, str(e)


def plan_tiling(args: argparse.Namespace, console: Console, spec: StepSpec, budget: int) -> None:
    """The table of tiles against halo exchange, and the choice at ``args.devices`` (or at
    the fewest devices where either fits without swapping or checkpointing)."""
    halo, reason = _halo(spec, args.freeze_norm)
    counts = [args.devices] if args.devices else [c for c in DEVICE_COUNTS
                                                  if c <= args.max_devices]  # fmt: skip
    rows = compare_tiling(spec, halo, counts, nonlocal_reason=reason, device_memory=budget,
                          max_redundancy=args.max_redundancy)  # fmt: skip
    table = Table(title=f"overlapping tiles (halo {'x'.join(map(str, halo))} per side, no "
                  "exchange) against halo exchange, peak per device")  # fmt: skip
    for col in ("devices", "grid", "tile with halo", "E", "halo exchange GiB", "tiles GiB",
                "choice"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.devices), "x".join(map(str, r.grid)), "x".join(map(str, r.tile)),
                      f"{r.redundancy:.3f}", f"{r.halo.peak / GIB:.2f}",
                      f"{r.tiles.peak / GIB:.2f}", r.choice)  # fmt: skip
    console.print(table)
    fits = [r for r in rows if min(r.halo.peak, r.tiles.peak) <= HEADROOM * budget]
    row = rows[0] if args.devices and rows else next(iter(fits), None)
    if reason is not None:
        console.print(f"halo exchange: {reason}")
    elif row is not None:
        name = "overlapping tiles" if row.choice == "tiles" else "halo exchange"
        console.print(f"at {row.devices} devices: [bold]{name}[/bold] ({row.reason}; tiles pay "
                      f"off up to E = {args.max_redundancy})")  # fmt: skip
    if args.devices and row is None:
        console.print(f"[red]{args.devices} devices cannot split {spec.image} into blocks of "
                      f"at least {2**spec.depth}; use fewer devices")  # fmt: skip


def tiles_run_spec(cfg: RunConfig, spec: StepSpec, model: object, console: Console) -> StepSpec:
    """``haloseg train --plan`` in tiles mode: the step of the largest tile, said so."""
    from haloseg.training.freeze import freeze_batch_norm
    from haloseg.training.tiles import local_receptive_field

    if cfg.train.freeze_norm:
        freeze_batch_norm(model)  # type: ignore[arg-type]
    rf = local_receptive_field(model.train(), spec.spatial_dims)  # type: ignore[attr-defined]
    grid = spec.grid or (1,) * spec.spatial_dims
    tile, e = tiles(spec.image, grid, rf.alignment, rf.halo)
    console.print(
        f"tiles mode: each of the {math.prod(grid)} processes of an image trains on a tile of "
        f"at most {'x'.join(map(str, tile))} (halo {'x'.join(map(str, rf.halo))} per side), "
        f"E = {e:.3f}"
    )
    return tile_spec(spec, tile)
