"""``haloseg plan``: predicted memory per device and the cheapest mix that fits."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from haloseg.cli.plan_layerwise import (
    add_layerwise_args,
    check_layerwise_args,
    plan_layerwise,
    plan_run_layerwise,
)
from haloseg.cli.plan_pipeline import add_pipeline_args, plan_pipeline, plan_run_stages
from haloseg.cli.plan_tiling import add_tiling_args, plan_tiling, tiles_run_spec
from haloseg.config import RunConfig
from haloseg.errors import ConfigError
from haloseg.memory.model import StepSpec
from haloseg.memory.planner import DTYPES, HEADROOM, PlanRow, plan, unet_spec
from haloseg.units import GIB, MIB, format_bytes, parse_bytes

__all__ = ["add_parser", "plan_run", "print_prediction", "size_arg"]


def size_arg(text: str) -> tuple[int, ...]:
    """``"1024x1024x1024"`` -> (1024, 1024, 1024)."""
    try:
        sides = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (2, 3) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 2-D or 3-D size like 512x512x512")
    return sides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict memory per device; the cheapest mix that fits")
    p.add_argument("--image", type=size_arg, required=True, help="e.g. 1024x1024x1024")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=2, help="output channels")
    p.add_argument("--channels", type=int, default=32, help="channels at level 0")
    p.add_argument("--depth", type=int, default=4, help="down-samplings")
    p.add_argument("--convs-per-level", type=int, default=2)
    p.add_argument("--norm", default="batch", choices=["batch", "instance", "group", "none"])
    p.add_argument("--upsampling", default="transposed",
                   choices=["transposed", "nearest", "linear"])  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="global batch (images per step)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device-memory", default="80GB", help="memory of one device, e.g. 80GB")
    p.add_argument("--max-devices", type=int, default=4096)
    p.add_argument("--top", type=int, default=12, help="rows of the table")
    p.add_argument("--plot", help="also draw the memory figures into this folder")
    p.add_argument("--json", help="write the rows to this JSON file")
    add_pipeline_args(p)
    add_tiling_args(p)
    add_layerwise_args(p)
    p.set_defaults(run=_plan)


def _plan(args: argparse.Namespace, console: Console) -> None:
    for name in ("in_channels", "classes", "channels", "depth", "convs_per_level", "batch",
                 "max_devices", "top"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    check_layerwise_args(args)
    budget = parse_bytes(args.device_memory)
    spec = unet_spec(
        image=args.image, in_channels=args.in_channels, classes=args.classes,
        channels=args.channels, depth=args.depth, convs_per_level=args.convs_per_level,
        norm=args.norm, upsampling=args.upsampling, batch=args.batch, dtype=args.dtype,
    )  # fmt: skip
    rows = plan(spec, budget, max_devices=args.max_devices)
    _table(console, rows[: args.top], budget)
    _verdict(console, rows, budget)
    plan_tiling(args, console, spec, budget)
    plan_layerwise(args, console)
    if args.pipeline is not None:
        plan_pipeline(args, console)
    try:
        if args.json:
            _write_json(rows, Path(args.json))
            console.print(f"wrote {args.json}")
        if args.plot:
            from haloseg.memory.figures import draw_figures

            paths = draw_figures(spec, budget, Path(args.plot))
            console.print("figures: " + ", ".join(str(p) for p in paths))
    except OSError as e:
        raise ConfigError(
            f"cannot write {e.filename or args.json or args.plot!r} ({e.strerror}); "
            "pick a writable --json file or --plot folder"
        ) from None


def _table(console: Console, rows: list[PlanRow], budget: int) -> None:
    table = Table(
        title=f"predicted peak memory per device (device: {format_bytes(budget)}; fits = "
        f"within {HEADROOM:.0%} of it)"
    )
    for col in ("mix", "devices", "peak GiB", "activations GiB", "halos MiB", "to host GiB",
                "time x", "fits"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        m = r.memory
        table.add_row(
            r.mix.describe(), str(r.mix.devices), f"{m.peak / GIB:.2f}",
            f"{m.activations / GIB:.2f}", f"{m.halos / MIB:.1f}",
            f"{m.swapped / GIB:.2f}", f"{r.mix.slowdown:.2f}", "yes" if r.fits else "no",
        )  # fmt: skip
    console.print(table)


def _verdict(console: Console, rows: list[PlanRow], budget: int) -> None:
    best = rows[0]
    if not best.fits:
        console.print(
            f"[red]nothing fits {format_bytes(budget)} within the device limit: the smallest "
            f"peak is {format_bytes(min(r.memory.peak for r in rows))}; raise --max-devices"
        )
        return
    console.print(
        f"cheapest that fits: [bold]{best.mix.describe()}[/bold] on {best.mix.devices} "
        f"device(s), {format_bytes(best.memory.peak, digits=2)} each, about "
        f"{best.mix.slowdown:.2f}x the plain step time"
    )


def _write_json(rows: list[PlanRow], path: Path) -> None:
    out = [
        {"grid": list(r.mix.grid), "data": r.mix.data, "swap": r.mix.swap,
         "checkpoint": r.mix.checkpoint, "devices": r.mix.devices, "fits": r.fits,
         "slowdown": r.mix.slowdown, **r.memory.as_dict()}
        for r in rows
    ]  # fmt: skip
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def print_prediction(console: Console, spec: StepSpec, budget: int | None) -> None:
    """One mix's prediction, for ``haloseg train --plan``."""
    from haloseg.memory.model import step_memory

    m = step_memory(spec)
    table = Table(title="predicted peak memory per device")
    table.add_column("part")
    table.add_column("MiB", justify="right")
    for name, value in m.as_dict().items():
        table.add_row(name, f"{value / MIB:,.1f}")
    console.print(table)
    if budget is not None:
        verdict = "fits" if m.peak <= HEADROOM * budget else "does NOT fit"
        console.print(f"{verdict} in {format_bytes(budget)} (within {HEADROOM:.0%} of it)")


def plan_run(cfg: RunConfig, console: Console) -> None:
    """``haloseg train CONFIG --plan``: the memory of the configured run, before it starts."""
    import torch

    from haloseg.memory.savers import run_spec
    from haloseg.models import unet_preset
    from haloseg.training.samples import padded_shape
    from haloseg.training.setup import build_datasets

    train_set, _ = build_datasets(cfg.data)
    shape = max((tuple(train_set.info(i).shape) for i in range(len(train_set))),
                key=math.prod)  # fmt: skip
    with torch.device("meta"):
        model = unet_preset(
            cfg.model.preset, spatial_dims=train_set.spatial_dims,
            in_channels=train_set.in_channels, out_channels=train_set.num_classes,
            **cfg.model.overrides(),
        )  # fmt: skip
    if cfg.memory.executor == "layerwise":
        image = padded_shape(shape, model.downsampling_factor, [1] * len(shape))
        plan_run_layerwise(cfg, model, image if cfg.data.pad else shape,
                           train_set.in_channels, console)  # fmt: skip
        return
    grid = cfg.parallel.grid or [1] * len(shape)
    if len(grid) != len(shape):
        raise ConfigError(
            f"parallel.grid={grid} has {len(grid)} extents but the images are "
            f"{len(shape)}-D ({'x'.join(map(str, shape))}); give one extent per spatial dim"
        )
    image = padded_shape(shape, model.downsampling_factor, grid) if cfg.data.pad else shape
    spec = run_spec(cfg, image, train_set.in_channels, train_set.num_classes, model)
    if cfg.parallel.mode == "tiles":
        spec = tiles_run_spec(cfg, spec, model, console)
    if cfg.parallel.pipeline > 1:
        with torch.device("cpu"):
            model = unet_preset(
                cfg.model.preset, spatial_dims=train_set.spatial_dims,
                in_channels=train_set.in_channels, out_channels=train_set.num_classes,
                **cfg.model.overrides(),
            )  # fmt: skip
        console.print(
            f"run {cfg.name!r}: largest image {'x'.join(map(str, image))}, block "
            f"{'x'.join(map(str, spec.block))} on a {'x'.join(map(str, grid))} grid in each of "
            f"{cfg.parallel.pipeline} pipeline stages x {cfg.parallel.data} data replicas"
        )
        plan_run_stages(cfg, model, tuple(spec.block), train_set.in_channels, console)
        return
    budget = parse_bytes(cfg.memory.device_memory) if cfg.memory.device_memory else None
    console.print(
        f"run {cfg.name!r}: largest image {'x'.join(map(str, image))}, block "
        f"{'x'.join(map(str, spec.block))} on a {'x'.join(map(str, grid))} grid x "
        f"{cfg.parallel.data} data replicas, batch {spec.batch} per replica, swap "
        f"{spec.swap}, checkpointing {'on' if spec.checkpoint else 'off'}"
    )
    print_prediction(console, spec, budget)
