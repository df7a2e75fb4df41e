"""Entry point of the ``haloseg`` command."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from haloseg.errors import HalosegError

__all__ = ["main"]


def _demo(args: argparse.Namespace, console: Console) -> None:
    from haloseg.cli.demo import run_demo

    grid = tuple(args.grid)
    console.print(
        f"Training step of the 'small' 2-D U-Net on a {args.size}x{args.size} image, split over "
        f"a {grid[0]}x{grid[1]} grid of processes, against the same step in one process (fp64)."
    )
    rows = run_demo(args.size, grid)  # type: ignore[arg-type]
    table = Table(title="spatial decomposition = one process")
    for col in ("rank", "block", "output err", "input-grad err", "param-grad err",
                "step s (P ranks)", "comm s"):  # fmt: skip
        table.add_column(col, justify="right")
    for rank, r in enumerate(rows):
        table.add_row(
            str(rank), "x".join(map(str, r["block"])), f"{r['output']:.1e}",
            f"{r['input_grad']:.1e}", f"{r['param_grad']:.1e}", f"{r['parallel_s']:.2f}",
            f"{r['comm_s']:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"one process, whole image: {rows[0]['single_s']:.2f} s per step")
    worst = max(max(r["output"], r["input_grad"], r["param_grad"]) for r in rows)
    console.print(f"largest relative difference to one process: {worst:.1e}")


def _bench_spatial(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.spatial import (
        SCENARIOS,
        markdown,
        report,
        run_spatial_benchmark,
        write_json,
    )

    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        raise HalosegError(
            f"scenario {unknown[0]!r} is not one of {', '.join(SCENARIOS)}; pick from those"
        )
    results = run_spatial_benchmark(args.scenario, args.ranks, args.steps, args.allocator)
    rows = report(results)
    table = Table(title="spatial decomposition: forward+backward step, worst rank, medians")
    for col in ("scenario", "mode", "ranks", "allocator", "step s", "cpu s", "time/plain",
                "peak MiB", "mem/(plain/P)", "comm share", "comm by kind (s)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["comm_s"].items() if v > 0)
        table.add_row(
            r["scenario"], r["mode"], str(r["ranks"]), r["allocator"], f"{r['step_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['time_vs_plain']:.2f}", f"{r['peak_mib']:.0f}",
            f"{r['memory_vs_plain_over_P']:.2f}", f"{r['comm_share']:.1%}", kinds,
        )  # fmt: skip
    console.print(table)
    if args.markdown:
        console.print(markdown(rows), markup=False, highlight=False, soft_wrap=True)
    if args.json:
        write_json(rows, Path(args.json), "haloseg " + shlex.join(sys.argv[1:]))
        console.print(f"wrote {args.json}")


def _grid(text: str) -> list[int]:
    try:
        grid = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not like 2x2") from None
    if len(grid) != 2 or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"grid {text!r} must be two positive extents like 2x2")
    return grid


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haloseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="spatial-parallel training step equals one process")
    demo.add_argument("--size", type=int, default=256, help="image side (multiple of 16)")
    demo.add_argument("--grid", type=_grid, default=[2, 2], help="process grid, e.g. 2x2")
    demo.set_defaults(run=_demo)
    bench = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    bsub = bench.add_subparsers(dest="benchmark", required=True)
    spatial = bsub.add_parser("spatial", help="memory, time and communication of decomposition")
    spatial.add_argument("--scenario", nargs="+", default=["2d-1024", "3d-128"])
    spatial.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    spatial.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    spatial.add_argument("--allocator", nargs="+", default=["default", "neutral"],
                         choices=["default", "neutral"])  # fmt: skip
    spatial.add_argument("--json", help="write the rows and the machine to this JSON file")
    spatial.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    spatial.set_defaults(run=_bench_spatial)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one line and exits 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    console = Console(width=None if sys.stdout.isatty() else 180)
    try:
        args.run(args, console)
    except HalosegError as e:
        print(f"haloseg: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
