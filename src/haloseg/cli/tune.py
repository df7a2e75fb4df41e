"""``haloseg tune``: a hyper-parameter search as parallel trials on Ray Tune; and
``haloseg bench tune``: experiment- against data-parallel trials of one fixed search."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_bench_parser", "add_parser", "run_bench", "run_tune"]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_tune(args: argparse.Namespace, console: Console) -> None:
    """The ``haloseg tune`` command."""
    from haloseg.config import load_config
    from haloseg.tune import load_search, ray_cluster, require_ray, run_search
    from haloseg.tune.cluster import check_cluster_flags

    check_cluster_flags(args.address, args.cpus, args.gpus)
    require_ray()
    base = load_config(args.config, args.overrides)
    search = load_search(args.search, base)
    with ray_cluster(args.address, cpus=args.cpus, gpus=args.gpus,
                     verbose=args.verbose, notify=console.print):  # fmt: skip
        results = run_search(
            base, search, resume=args.resume, storage=args.storage, progress=not args.no_progress
        )
    table = Table(title=f"{len(results.rows)} trials, best {results.metric} first")
    for col in results.columns:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for row in results.rows:
        table.add_row(*(_cell(row.get(c)) for c in results.columns))
    console.print(table)
    folder = Path(base.output_dir)
    console.print(f"results: {folder}/results.csv, {folder}/results.png; trials and "
                  f"checkpoints: {results.path}")  # fmt: skip


def add_parser(sub: Any) -> None:
    """Register ``haloseg tune`` on the command's subparsers."""
    tune = sub.add_parser(
        "tune", help="hyper-parameter search as parallel trials on Ray (extra haloseg[tune])"
    )
    tune.add_argument("config", help="base YAML config, e.g. configs/ellipses-2d.yaml")
    tune.add_argument("overrides", nargs="*", help="key=value on the base config")
    tune.add_argument(
        "--search", required=True, help="search file, e.g. configs/search-ellipses.yaml"
    )
    tune.add_argument(
        "--resume", action="store_true", help="continue the search in output_dir, keeping "
        "finished trials",
    )  # fmt: skip
    tune.add_argument(
        "--address", help="join this Ray cluster (auto, or HOST:PORT) instead of starting a "
        "local instance",
    )  # fmt: skip
    tune.add_argument(
        "--storage", help="shared storage of a multi-node cluster (a folder every node sees, "
        "or a URI); the experiment goes to STORAGE/NAME",
    )  # fmt: skip
    tune.add_argument("--cpus", type=int, help="CPUs of a local Ray instance (all if unset)")
    tune.add_argument("--gpus", type=int, help="GPUs of a local Ray instance (all if unset)")
    tune.add_argument("--no-progress", action="store_true", help="no Tune status table")
    tune.set_defaults(run=run_tune)


def run_bench(args: argparse.Namespace, console: Console) -> None:
    """The ``haloseg bench tune`` command."""
    from haloseg.bench.tune import markdown, run_tune_benchmark
    from haloseg.cli.bench import emit as _emit

    rows = run_tune_benchmark(args.workers, args.steps, args.size, args.modes)
    table = Table(title=f"one search of {rows[0]['trials']} trials, {args.workers} workers")
    for col in ("mode", "workers", "concurrent trials", "processes per trial", "wall s",
                "trial s (median)", "speed-up", "best dice_mean"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["mode"], str(r["workers"]), str(r["concurrent"]), str(r["processes"]),
            f"{r['wall_s']:.1f}", f"{r['trial_s_median']:.1f}", f"{r['speedup']:.2f}",
            _cell(r["best_dice_mean"]),
        )  # fmt: skip
    _emit(args, console, table, markdown(rows), rows)


def add_bench_parser(bsub: Any) -> None:
    """Register ``haloseg bench tune`` on the benchmark subparsers."""
    from haloseg.bench.tune import MODES
    from haloseg.cli.bench import output_args as _output_args

    bench = bsub.add_parser("tune", help="one search: sequential, parallel trials, "
                            "data-parallel trials")  # fmt: skip
    bench.add_argument("--workers", type=int, default=2, help="CPUs (one thread each)")
    bench.add_argument("--steps", type=int, default=280, help="training steps per trial")
    bench.add_argument("--size", type=int, default=128, help="image side")
    bench.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    _output_args(bench)
    bench.set_defaults(run=run_bench)
