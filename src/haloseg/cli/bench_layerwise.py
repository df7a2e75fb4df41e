"""``haloseg bench layerwise``: layer-wise execution against plain execution (time, compute
memory at two image sizes) and against tiled inference (redundant work)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from haloseg.cli.bench import emit, output_args
from haloseg.errors import ConfigError

__all__ = ["add_layerwise_parser"]


def _bench_layerwise(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.layerwise import markdown, run_layerwise_benchmark

    if min(args.sizes) < 16 or args.block < 1 or args.repeats < 1 or args.threads < 1:
        raise ConfigError(
            f"--sizes {args.sizes} --block {args.block} --repeats {args.repeats} --threads "
            f"{args.threads}: give sides >= 16 (the U-Net's alignment) and the rest >= 1"
        )
    rows = run_layerwise_benchmark(args.sizes, args.block, args.repeats, args.threads,
                                   args.norm)  # fmt: skip
    table = Table(title=f"layer-wise execution, small 3-D U-Net ({args.norm} norm), "
                  f"{args.threads} thread(s), medians of {args.repeats}")  # fmt: skip
    for col in ("image", "block", "plain s", "layer-wise s", "÷ plain", "plain peak MiB",
                "compute peak MiB", "store peak MiB", "FLOPs ÷ plain", "tiles (halo)",
                "tiles FLOPs ÷ plain"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['size']}³", f"{r['block']}³", f"{r['plain_s']:.2f}", f"{r['layerwise_s']:.2f}",
            f"{r['time_ratio']:.2f}", f"{r['plain_peak_mib']:.0f}",
            f"{r['compute_peak_mib']:.1f}", f"{r['store_peak_mib']:.0f}",
            f"{r['flop_redundancy']:.3f}", f"{r['tiles']} ({r['halo']})",
            f"{r['tiled_flop_redundancy']:.1f}",
        )  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def add_layerwise_parser(bsub: argparse._SubParsersAction) -> None:
    """Register ``haloseg bench layerwise``."""
    p = bsub.add_parser("layerwise", help="layer-wise execution against plain execution and "
                        "tiles: time, compute memory, redundant work")  # fmt: skip
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128], help="cube sides")
    p.add_argument("--block", type=int, default=32, help="block side (and tile core)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--norm", default="instance", choices=["instance", "group", "batch", "none"])
    output_args(p)
    p.set_defaults(run=_bench_layerwise)
