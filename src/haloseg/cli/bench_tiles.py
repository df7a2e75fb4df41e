"""``haloseg bench tiles``: overlap-tile training against halo exchange, and the Summit scene
as 64 tiles run one after another."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from haloseg.cli.bench import emit, output_args
from haloseg.errors import ConfigError

__all__ = ["add_tiles_parser"]


def _bench_tiles(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.tiles import markdown, ratio_text, run_scene_benchmark, run_step_benchmark

    if args.steps < 1 or args.scene_grid < 1 or args.channels < 1 or args.threads < 1:
        raise ConfigError(
            f"--steps {args.steps} --scene-grid {args.scene_grid} --channels {args.channels} "
            f"--threads {args.threads}: each must be >= 1"
        )
    rows = []
    if "step" in args.part:
        rows += run_step_benchmark(args.ranks, args.size, args.steps)
    if "scene" in args.part:
        rows += run_scene_benchmark(args.scene, args.scene_grid, args.channels, args.max_tiles,
                                    args.threads)  # fmt: skip
    table = Table(title="training step: halo exchange against overlapping tiles (medians, "
                  "slowest rank), and the scene's tiles one after another")  # fmt: skip
    for col in ("part", "mode", "ranks / tiles", "input", "halo", "E", "s per step / tile",
                "time / halo exchange", "peak MiB"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        if r["part"] == "step":
            table.add_row("step", r["mode"], f"{r['ranks']} ({r['grid']})", r["input"],
                          str(r["halo"]), f"{r['redundancy']:.3f}", f"{r['step_s']:.2f}",
                          ratio_text(r),
                          ", ".join(f"{m:.0f}" for m in r["peak_mib"]))  # fmt: skip
        else:
            table.add_row("scene", f"{r['scene']}², 4 bands", f"{r['tiles_run']} ({r['grid']})",
                          f"≤ {r['largest_tile']}", str(r["halo"]), f"{r['redundancy']:.3f}",
                          f"{r['tile_s']:.1f}", "—", f"{r['peak_mib']:.0f}")  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def add_tiles_parser(bsub: argparse._SubParsersAction) -> None:
    """Register ``haloseg bench tiles``."""
    p = bsub.add_parser("tiles", help="overlap-tile training against halo exchange; the "
                        "Summit scene as 64 tiles")  # fmt: skip
    p.add_argument("--part", nargs="+", default=["step", "scene"], choices=["step", "scene"])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4], choices=[2, 4])
    p.add_argument("--size", type=int, default=1024, help="image side of the step part")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--scene", type=int, default=10000, help="scene side (4 bands)")
    p.add_argument("--scene-grid", type=int, default=8, help="tiles per side of the scene")
    p.add_argument("--channels", type=int, default=8, help="base channels of the scene's U-Net")
    p.add_argument("--max-tiles", type=int, help="run only this many of the scene's tiles")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the scene part")
    output_args(p)
    p.set_defaults(run=_bench_tiles)
