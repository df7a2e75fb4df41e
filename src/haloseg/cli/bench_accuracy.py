"""``haloseg bench accuracy``: whole-image training against patch training (and progressive
patch growth) on tasks where context decides the class, and on a control task."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from haloseg.cli.bench import output_args
from haloseg.errors import ConfigError

__all__ = ["add_accuracy_parser"]


def _grid(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(g) for g in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--whole-grid {text!r} is not a grid like 2x2 or 1x1") from None


def _writable(flag: str, path: str | None) -> None:
    # Checked before an hour of training, not after it.
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {Path(path).parent} does not exist; create it")


def _config(args: argparse.Namespace) -> Any:
    from haloseg.bench.accuracy import AccuracyConfig

    size = args.size or (128 if args.dims == 2 else 64)
    tasks = {"tasks": tuple(args.tasks)} if args.tasks else {}
    return AccuracyConfig(
        **tasks, size=size, spatial_dims=args.dims,
        seeds=args.seeds, steps=args.steps, patch_fractions=tuple(args.patch_fractions),
        progressive=not args.no_progressive, whole_grid=_grid(args.whole_grid),
        train_images=args.train_images, test_images=args.test_images, noise=args.noise,
        depth=args.depth, norm=args.norm, threads=args.threads,
    )  # fmt: skip


def _line(record: dict[str, Any]) -> str:
    dice = " ".join(f"{d:.3f}" for d in record["dice"])
    return (f"{record['task']} seed {record['seed']} {record['arm']}: Dice {dice}, "
            f"{record['train_s']:.0f} s")  # fmt: skip


def _bench_accuracy(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench import accuracy_report as report
    from haloseg.bench.accuracy import arms, run_study

    cfg = _config(args)
    _writable("--json", args.json)
    _writable("--plot", args.plot)
    study = arms(cfg)
    voxels = cfg.size**cfg.spatial_dims
    console.print(
        f"{len(study)} arms ({', '.join(a.name for a in study)}) × {cfg.seeds} seed(s) per task; "
        f"each arm: {cfg.steps} steps × {voxels} voxels = {cfg.steps * voxels:,} voxels seen; "
        f"whole images over a {'x'.join(map(str, cfg.grid))} grid of "
        f"{math.prod(cfg.grid)} process(es)"
    )
    with Progress("[bold]accuracy", BarColumn(), MofNCompleteColumn(), "arms",
                  TimeRemainingColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task("accuracy", total=None)

        def progress(done: int, total: int, record: dict[str, Any]) -> None:
            bar.console.print(_line(record))
            bar.update(task, completed=done, total=total)

        records = run_study(cfg, progress=progress)
    rows = report.summarise(records, cfg)
    comparison = report.compare(rows)
    console.print(_table(rows), _comparison_table(comparison))
    if args.markdown:
        console.print(report.markdown(rows, comparison), markup=False, highlight=False,
                      soft_wrap=True)  # fmt: skip
    if args.json:
        command = "haloseg " + shlex.join(sys.argv[1:])
        report.write_json(args.json, cfg, rows, comparison, records, command)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(rows, args.plot, cfg.size)
        console.print(f"wrote {args.plot}")


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Dice on held-out images: mean ± std over seeds")
    for col in ("task", "arm", "side × batch", "inference", "class 1", "class 2", "mean",
                "train s"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        d = r["dice"]
        table.add_row(
            r["task"], r["arm"], " → ".join(f"{s['side']}×{s['batch']}" for s in r["stages"]),
            r["inference"], *(f"{d[k]['mean']:.3f} ± {d[k]['std']:.3f}"
                              for k in ("class1", "class2", "mean")), f"{r['train_s']:.0f}",
        )  # fmt: skip
    return table


def _comparison_table(comparison: list[dict[str, Any]]) -> Table:
    table = Table(title="minus the best patch arm: difference of means ± std of the per-seed "
                  "differences (Dice, mean of the classes)")  # fmt: skip
    for col in ("task", "best patch arm", "whole − best", "progressive − best"):
        table.add_column(col, justify="right")
    for c in comparison:
        cells = []
        for name in ("whole", "progressive"):
            diff = c.get(f"{name}_minus_best_patch")
            cells.append(f"{diff['mean']['mean']:+.3f} ± {diff['mean']['std']:.3f}"
                         if diff else "—")  # fmt: skip
        table.add_row(c["task"], c["best_patch"], *cells)
    return table


def add_accuracy_parser(bsub: argparse._SubParsersAction) -> None:
    """Register ``haloseg bench accuracy``."""
    p = bsub.add_parser("accuracy", help="whole-image against patch training: Dice per task "
                        "where context matters and on a control")  # fmt: skip
    p.add_argument("--tasks", nargs="+", help="tasks of haloseg.data.context (default: all)")
    p.add_argument("--dims", type=int, default=2, choices=[2, 3], help="spatial dimensions")
    p.add_argument("--size", type=int, help="image side (default 128 in 2-D, 64 in 3-D)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per task")
    p.add_argument("--steps", type=int, default=450, help="training steps of every arm")
    p.add_argument("--patch-fractions", nargs="+", type=float, default=[0.25, 0.5],
                   help="patch sides as fractions of the image side")  # fmt: skip
    p.add_argument("--no-progressive", action="store_true", help="skip progressive growth")
    p.add_argument("--whole-grid", help="process grid of the whole-image arm (default 2x2, "
                   "2x2x1 in 3-D; 1x1: the same computation in one process)")  # fmt: skip
    p.add_argument("--train-images", type=int, default=32, help="training images per seed")
    p.add_argument("--test-images", type=int, default=16, help="held-out images per task")
    p.add_argument("--noise", type=float, default=0.3, help="image noise level")
    p.add_argument("--depth", type=int, default=4, help="down-samplings of the U-Net (its "
                   "receptive field, 189 voxels wide at 4, should span the image)")  # fmt: skip
    p.add_argument("--norm", default="instance", choices=["batch", "instance", "group"])
    p.add_argument("--threads", type=int, help="torch threads of the one-process arms "
                   "(default: every core)")  # fmt: skip
    p.add_argument("--plot", help="write the figure (Dice against patch side) to this PNG")
    output_args(p)
    p.set_defaults(run=_bench_accuracy)
