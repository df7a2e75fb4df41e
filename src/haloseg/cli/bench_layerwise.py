"""``haloseg bench layerwise``: layer-wise execution against plain execution (time, compute
memory at two image sizes) and against tiled inference (redundant work)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from haloseg.cli.bench import emit, output_args
from haloseg.errors import ConfigError

__all__ = ["add_layerwise_parser"]


_INFER = {"image": lambda r: f"{r['size']}³", "block": lambda r: f"{r['block']}³",
          "plain s": lambda r: f"{r['plain_s']:.2f}",
          "layer-wise s": lambda r: f"{r['layerwise_s']:.2f}",
          "÷ plain": lambda r: f"{r['time_ratio']:.2f}",
          "plain peak MiB": lambda r: f"{r['plain_peak_mib']:.0f}",
          "compute peak MiB": lambda r: f"{r['compute_peak_mib']:.1f}",
          "store peak MiB": lambda r: f"{r['store_peak_mib']:.0f}",
          "FLOPs ÷ plain": lambda r: f"{r['flop_redundancy']:.3f}",
          "tiles (halo)": lambda r: f"{r['tiles']} ({r['halo']})",
          "tiles FLOPs ÷ plain": lambda r: f"{r['tiled_flop_redundancy']:.1f}"}  # fmt: skip
_TRAIN = {k: v for k, v in _INFER.items() if not k.startswith("tiles")}


def _bench_layerwise(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench import layerwise

    if min(args.sizes) < 16 or args.block < 1 or args.repeats < 1 or args.threads < 1:
        raise ConfigError(
            f"--sizes {args.sizes} --block {args.block} --repeats {args.repeats} --threads "
            f"{args.threads}: give sides >= 16 (the U-Net's alignment) and the rest >= 1"
        )
    if args.train:
        run, cols, what = layerwise.run_training_benchmark, _TRAIN, "training step"
        markdown = layerwise.training_markdown
    else:
        run, cols, what = layerwise.run_layerwise_benchmark, _INFER, "execution"
        markdown = layerwise.markdown
    rows = run(args.sizes, args.block, args.repeats, args.threads, args.norm)
    table = Table(title=f"layer-wise {what}, small 3-D U-Net ({args.norm} norm), "
                  f"{args.threads} thread(s), medians of {args.repeats}")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(cell(r) for cell in cols.values()))
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
    p.add_argument("--train", action="store_true", help="a training step (forward and "
                   "backward) instead of an inference")  # fmt: skip
    output_args(p)
    p.set_defaults(run=_bench_layerwise)
