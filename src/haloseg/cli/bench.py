"""``haloseg bench``: the benchmarks' command lines, each printing a table and, if asked, its
Markdown and JSON."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from haloseg.cli import tune as tune_cli
from haloseg.cli.plan import size_arg
from haloseg.errors import ConfigError, HalosegError

__all__ = ["add_parser", "emit", "output_args"]


def emit(args: argparse.Namespace, console: Console, table: Table, md: str, rows: list) -> None:
    """Print a benchmark's table, and its Markdown and JSON if asked for."""
    from haloseg.bench.spatial import write_json

    console.print(table)
    if args.markdown:
        console.print(md, markup=False, highlight=False, soft_wrap=True)
    if args.json:
        write_json(rows, Path(args.json), "haloseg " + shlex.join(sys.argv[1:]))
        console.print(f"wrote {args.json}")


def _bench_spatial(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.spatial import (
        SCENARIOS,
        markdown,
        report,
        run_spatial_benchmark,
    )

    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        raise HalosegError(
            f"scenario {unknown[0]!r} is not one of {', '.join(SCENARIOS)}; pick from those"
        )
    results = run_spatial_benchmark(args.scenario, args.ranks, args.steps, args.allocator,
                                    args.memory_format)  # fmt: skip
    rows = report(results)
    table = Table(title="spatial decomposition: forward+backward step, worst rank, medians")
    for col in ("scenario", "mode", "format", "ranks", "allocator", "step s", "cpu s",
                "time/plain", "time/best plain", "peak MiB", "mem/(plain/P)", "comm share",
                "late wait", "transfer", "cpu spread", "comm by kind (s)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["comm_s"].items() if v > 0)
        table.add_row(
            r["scenario"], r["mode"], r["memory_format"], str(r["ranks"]), r["allocator"],
            f"{r['step_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['time_vs_plain']:.2f}",
            f"{r['time_vs_best_plain']:.2f}", f"{r['peak_mib']:.0f}",
            f"{r['memory_vs_plain_over_P']:.2f}",
            *("—" if r["mode"] == "plain PyTorch" else f"{r[k]:.1%}"
              for k in ("comm_share", "late_wait_share", "transfer_share")),
            "—" if r["ranks"] == 1 else f"{r['cpu_spread']:.1%}", kinds,
        )  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def _bench_train(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.training import markdown, run_training_benchmark

    rows = run_training_benchmark(args.ranks, args.steps, args.size, args.allocator)
    table = Table(title=f"training throughput, demo task ({args.size}x{args.size}), medians")
    for col in ("ranks", "grid", "allocator", "step s", "images/s", "speed-up",
                "step peak MiB per rank", "max / 1 rank"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["ranks"]), r["grid"], r["allocator"], f"{r['step_s']:.3f}",
            f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}",
            ", ".join(f"{m:.0f}" for m in r["step_peak_mib"]), f"{r['memory_vs_1_rank']:.2f}",
        )  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def _bench_infer(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.inference import SCENARIOS, markdown, run_inference_benchmark

    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        raise HalosegError(
            f"scenario {unknown[0]!r} is not one of {', '.join(SCENARIOS)}; pick from those"
        )
    rows = run_inference_benchmark(args.scenario, threads=args.threads, allocator=args.allocator)
    table = Table(title="tiled inference against whole-image and MONAI sliding window")
    for col in ("scenario", "method", "settings", "wall s", "peak MiB", "max rel diff",
                "labels differing", "speed-up"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        rel = r.get("max_rel_diff")
        table.add_row(
            r["scenario"], r["method"], r["settings"], f"{r['wall_s']:.1f}",
            f"{r['peak_mib']:.0f}", "—" if rel is None else f"{rel:.1e}",
            "—" if r.get("label_mismatch") is None else f"{r['label_mismatch']:.1e}",
            "—" if r.get("speedup_vs_monai") is None else f"{r['speedup_vs_monai']:.2f}",
        )  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def _bench_memory(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.memory import CONFIGS, markdown, run_memory_benchmark

    configs = tuple(c for c in CONFIGS if not args.only or any(o in c.name for o in args.only))
    if not configs:
        raise ConfigError(f"--only {args.only} matches no configuration; names: "
                          + ", ".join(c.name for c in CONFIGS))  # fmt: skip
    if args.swap_gpu_json:
        from haloseg.bench.memory import swap_benchmark_rows

        rows = swap_benchmark_rows(args.swap_gpu_json)
    else:
        rows = run_memory_benchmark(configs, device=args.device, scale=args.scale)
    table = Table(title=f"memory model: predicted vs measured peak per device ({args.device})")
    for col in ("config", "image", "predicted MiB", "measured MiB", "predicted / measured"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], r["image"], f"{r['predicted_mib']:.1f}",
                      f"{r['measured_mib']:.1f}", f"{r['ratio']:.3f}")  # fmt: skip
    emit(args, console, table, markdown(rows), rows)


def _bench_pipeline(args: argparse.Namespace, console: Console) -> None:
    from haloseg.bench.pipeline import SCENARIOS, balance_rows, markdown, run_pipeline_benchmark

    if args.scenario not in SCENARIOS:
        raise HalosegError(
            f"scenario {args.scenario!r} is not one of {', '.join(SCENARIOS)}; pick from those"
        )
    if min(args.stages) < 2 or min(args.microbatches) < 1 or args.repeats < 1:
        raise ConfigError(
            f"--stages {args.stages} --microbatches {args.microbatches} --repeats "
            f"{args.repeats}: give stage counts >= 2 (one stage is always measured), "
            "micro-batch counts >= 1 and repeats >= 1"
        )
    rows = run_pipeline_benchmark(args.scenario, args.stages, args.microbatches,
                                  args.schedule, args.steps, args.balance,
                                  args.repeats)  # fmt: skip
    balance = balance_rows(args.balance_preset, args.balance_image, args.balance_stages,
                           max(args.microbatches)) if args.balance_stages else []  # fmt: skip
    table = Table(title=f"pipeline stages, {args.scenario}: step time (median), one thread "
                  "per process")  # fmt: skip
    for col in ("stages", "micro-batches", "schedule", "balance", "blocks", "step s",
                "÷ one stage", "÷ one stage, equal cores", "stage CPU slowest/mean",
                "peak MiB per stage"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["stages"]), str(r["microbatches"]), r["schedule"], r["balance_mode"],
            str(r["blocks"]), f"{r['step_s']:.3f}", f"{r['speedup']:.2f}",
            f"{r['speedup_equal_cores']:.2f}", f"{r['cpu_slowest_over_mean']:.3f}",
            " ".join(f"{p:.0f}" for p in r["peak_mib"]),
        )  # fmt: skip
    emit(args, console, table, markdown(rows, balance),
         rows + [{"balancer": b} for b in balance])  # fmt: skip
    if balance:
        bt = Table(
            title=f"balancer, {args.balance_preset} preset at "
            f"{'x'.join(map(str, args.balance_image))} (block costs measured here)"
        )
        for col in ("stages", "balanced", "slowest/mean", "even split", "slowest/mean",
                    "stage memory MiB"):  # fmt: skip
            bt.add_column(col, justify="right")
        for b in balance:
            bt.add_row(str(b["stages"]), str(b["balanced"]),
                       f"{b['balanced_slowest_over_mean']:.3f}", str(b["even"]),
                       f"{b['even_slowest_over_mean']:.3f}",
                       " ".join(f"{m:.0f}" for m in b["stage_memory_mib"]))  # fmt: skip
        console.print(bt)


def output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write the rows and the machine to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``haloseg bench`` and its benchmarks on the command's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    bsub = bench.add_subparsers(dest="benchmark", required=True)
    spatial = bsub.add_parser("spatial", help="memory, time and communication of decomposition")
    spatial.add_argument("--scenario", nargs="+", default=["2d-1024", "3d-128"])
    spatial.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    spatial.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    spatial.add_argument("--allocator", nargs="+", default=["default", "neutral"],
                         choices=["default", "neutral"])  # fmt: skip
    spatial.add_argument("--memory-format", nargs="+", default=["contiguous", "channels_last"],
                         choices=["contiguous", "channels_last"],
                         help="layouts of weights and input, each run in full")  # fmt: skip
    output_args(spatial)
    spatial.set_defaults(run=_bench_spatial)
    btrain = bsub.add_parser("train", help="training throughput of the demo task, 1/2/4 ranks")
    btrain.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], choices=[1, 2, 4])
    btrain.add_argument("--steps", type=int, default=12, help="training steps per run")
    btrain.add_argument("--size", type=int, default=256, help="image side")
    btrain.add_argument("--allocator", nargs="+", default=["default", "neutral"],
                        choices=["default", "neutral"])  # fmt: skip
    output_args(btrain)
    btrain.set_defaults(run=_bench_train)
    binfer = bsub.add_parser("infer", help="tiled inference vs whole image vs MONAI")
    binfer.add_argument("--scenario", nargs="+", default=["2d-8192", "3d-256"])
    binfer.add_argument("--threads", type=int, default=1, help="torch threads per run")
    binfer.add_argument("--allocator", default="default", choices=["default", "neutral"])
    output_args(binfer)
    binfer.set_defaults(run=_bench_infer)
    bmem = bsub.add_parser("memory", help="memory model: predicted vs measured peak memory")
    bmem.add_argument("--device", default="cpu", help="cpu or cuda")
    bmem.add_argument("--scale", type=int, default=1, help="multiply every image side")
    bmem.add_argument("--only", nargs="+", help="configurations whose name contains these")
    bmem.add_argument("--swap-gpu-json", help="instead, predict the GPU peaks measured by "
                      "benchmarks/swap_gpu.py (its --json file)")  # fmt: skip
    output_args(bmem)
    bmem.set_defaults(run=_bench_memory)
    bpipe = bsub.add_parser("pipeline", help="pipeline stages: speed-up against one stage, "
                            "and the balancer against an even split")  # fmt: skip
    bpipe.add_argument("--scenario", default="2d-256", help="2d-256 | 2d-512 | large-2d-128")
    bpipe.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    bpipe.add_argument("--microbatches", nargs="+", type=int, default=[4, 8, 16])
    bpipe.add_argument("--schedule", nargs="+", default=["gpipe", "1f1b"],
                       choices=["gpipe", "1f1b"])  # fmt: skip
    bpipe.add_argument(
        "--balance",
        nargs="+",
        default=["auto"],
        choices=["auto", "even"],
        help="measured balance, or an even split of the blocks",
    )
    bpipe.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    bpipe.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every configuration, interleaved (medians over them)",
    )
    bpipe.add_argument("--balance-preset", default="large", choices=["small", "medium", "large"])
    bpipe.add_argument("--balance-image", type=size_arg, default=(512, 512))
    bpipe.add_argument(
        "--balance-stages",
        nargs="*",
        type=int,
        default=[2, 4, 6],
        help="stage counts of the balancer table (none: skip it)",
    )
    output_args(bpipe)
    bpipe.set_defaults(run=_bench_pipeline)
    tune_cli.add_bench_parser(bsub)
    from haloseg.cli.bench_accuracy import add_accuracy_parser
    from haloseg.cli.bench_layerwise import add_layerwise_parser
    from haloseg.cli.bench_tiles import add_tiles_parser

    add_tiles_parser(bsub)
    add_layerwise_parser(bsub)
    add_accuracy_parser(bsub)
