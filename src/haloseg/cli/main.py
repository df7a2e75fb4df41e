"""Entry point of the ``haloseg`` command."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from haloseg.cli import evaluate as evaluate_cli
from haloseg.cli import plan as plan_cli
from haloseg.cli import tune as tune_cli
from haloseg.errors import ConfigError, HalosegError

__all__ = ["main"]


def _demo(args: argparse.Namespace, console: Console) -> None:
    from haloseg.cli.demo import GRID, run_demo

    console.print(
        f"Training a U-Net on synthetic ellipses ({args.size}x{args.size}, 3 classes), each "
        f"image split over a {GRID[0]}x{GRID[1]} grid of processes, then timing the same "
        "step in one process."
    )
    folder, metrics, rows = run_demo(args.output, steps=args.steps, size=args.size)
    table = Table(title="per-rank cost of one training step (medians)")
    for col in ("run", "rank", "step s", "x one process", "step peak MiB", "x one process",
                "process peak MiB"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["run"], str(r["rank"]), f"{r['step_s']:.3f}", f"{r['time_vs_single']:.2f}",
            f"{r['step_peak_mib']:.1f}", f"{r['memory_vs_single']:.2f}",
            f"{r['process_peak_mib']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        "Each of the 4 ranks holds a quarter of every image. On a machine with fewer cores than "
        "ranks they take turns on the cores, so the step time shows the sharing as much as the "
        "method; docs/benchmarks.md has the scaling at 1024²."
    )
    dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("dice_"))
    console.print(f"validation Dice: {dice}")
    console.print(f"outputs: {folder}/ (metrics.json, overlays.png, curve.png, comparison.md, "
                  "tensorboard/, checkpoints/)")  # fmt: skip


def _train(args: argparse.Namespace, console: Console) -> None:
    import torch.distributed as dist

    from haloseg.config import load_config
    from haloseg.training import train

    cfg = load_config(args.config, args.overrides)
    if args.plan:
        plan_cli.plan_run(cfg, console)
        return
    try:
        metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics["rank"] == 0:
        dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("dice_"))
        console.print(f"step {metrics['steps']}: validation Dice {dice}")
        console.print(f"outputs: {cfg.output_dir}/")


def _infer(args: argparse.Namespace, console: Console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from haloseg.inference.budget import parse_bytes
    from haloseg.inference.run import infer, infer_folder

    budget = parse_bytes(args.max_memory) if args.max_memory else None
    source = Path(args.input)
    many = source.is_dir() and source.suffix != ".zarr" or source.name == "dataset.json"
    with Progress("[bold]infer", BarColumn(), MofNCompleteColumn(), "tiles",
                  TimeRemainingColumn(), disable=args.no_progress) as bar:  # fmt: skip
        task = bar.add_task("infer", total=None)
        options = dict(
            tile=args.tile, max_memory=budget, output=args.output_type,
            batch_size=args.batch_size, device=args.device, grid=args.grid,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
        if many:

            def on_case(name: str, number: int, total: int, skipped: bool) -> None:
                bar.reset(task, total=None)
                verb = "exists, skipped" if skipped else "predicting"
                bar.console.print(f"[{number}/{total}] {name}: {verb}")

            results = infer_folder(args.checkpoint, source, args.output,
                                   suffix=args.output_suffix, on_case=on_case,
                                   **options)  # fmt: skip
        else:
            results = [infer(args.checkpoint, source, args.output, preview=args.preview,
                             **options)]  # fmt: skip
    if many:
        console.print(f"wrote {len(results)} prediction(s) into {args.output}")
    preview = f", preview {args.preview}" if args.preview and not many else ""
    for r in results:
        console.print(f"wrote {r.get('output', args.output)}: {_describe_inference(r)}{preview}")


def _describe_inference(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    norm = f", {r['normalize']} normalised" if r["normalize"] != "none" else ""
    if r["mode"] == "tiles":
        tile = "x".join(map(str, r["tile"]))
        return f"{shape}, tiles of {tile} + halo {r['halo'][0]} per side{norm}"
    grid = "x".join(map(str, r["grid"]))
    return f"{shape}, whole-image forward over a {grid} grid of processes{norm}"


def _data_synth(args: argparse.Namespace, console: Console) -> None:
    from haloseg.data import EllipseDataset, export_dataset

    dataset = EllipseDataset(
        args.shape, num_images=args.num_images, num_classes=args.num_classes,
        in_channels=args.in_channels, noise=args.noise, seed=args.seed,
    )  # fmt: skip
    out = export_dataset(dataset, args.out, args.format, scanner=args.scanner)
    shape = "x".join(map(str, args.shape))
    look = " with scanner-like intensities and geometry" if args.scanner else ""
    console.print(f"wrote {args.num_images} {shape} ellipse images as {args.format}{look}: {out}")


def _emit(args: argparse.Namespace, console: Console, table: Table, md: str, rows: list) -> None:
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
    results = run_spatial_benchmark(args.scenario, args.ranks, args.steps, args.allocator)
    rows = report(results)
    table = Table(title="spatial decomposition: forward+backward step, worst rank, medians")
    for col in ("scenario", "mode", "ranks", "allocator", "step s", "cpu s", "time/plain",
                "peak MiB", "mem/(plain/P)", "comm share", "late wait", "transfer",
                "cpu spread", "comm by kind (s)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["comm_s"].items() if v > 0)
        table.add_row(
            r["scenario"], r["mode"], str(r["ranks"]), r["allocator"], f"{r['step_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{r['time_vs_plain']:.2f}", f"{r['peak_mib']:.0f}",
            f"{r['memory_vs_plain_over_P']:.2f}",
            *("—" if r["mode"] == "plain PyTorch" else f"{r[k]:.1%}"
              for k in ("comm_share", "late_wait_share", "transfer_share")),
            "—" if r["ranks"] == 1 else f"{r['cpu_spread']:.1%}", kinds,
        )  # fmt: skip
    _emit(args, console, table, markdown(rows), rows)


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
    _emit(args, console, table, markdown(rows), rows)


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
    _emit(args, console, table, markdown(rows), rows)


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
    _emit(args, console, table, markdown(rows), rows)


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write the rows and the machine to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haloseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on synthetic ellipses over 2x2 processes")
    demo.add_argument("--steps", type=int, default=200, help="training steps")
    demo.add_argument("--size", type=int, default=256, help="image side")
    demo.add_argument("--output", help="run folder (default runs/demo-TIME)")
    demo.set_defaults(run=_demo)
    train = sub.add_parser(
        "train", help="train a U-Net (also under torchrun: python -m haloseg train ...)"
    )
    train.add_argument("config", help="YAML config, e.g. configs/ellipses-2d.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    train.add_argument(
        "--resume", action="store_true", help="continue from the run folder's last checkpoint"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--plan", action="store_true", help="print the predicted memory per device and stop"
    )
    train.set_defaults(run=_train)
    inf = sub.add_parser("infer", help="exact inference of an image file or a folder of them")
    inf.add_argument("--checkpoint", required=True, help="run folder or checkpoint .pt")
    inf.add_argument("--input", required=True, help=".npy, .zarr, .tif, .nii(.gz) image; or a "
                     "folder of them (nnU-Net CASE_0000 channel files grouped), or a Decathlon "
                     "dataset.json (its test list)")  # fmt: skip
    inf.add_argument("--output", required=True, help=".npy, .zarr, .tif or .nii(.gz) result; "
                     "a folder for a folder input")  # fmt: skip
    inf.add_argument("--output-suffix", help="suffix of a folder's outputs, e.g. .nii.gz "
                     "(default: each input's own)")  # fmt: skip
    inf.add_argument("--grid", type=int, nargs="+", help="split the image over this grid of "
                     "processes (torchrun) and run one whole-image forward pass")  # fmt: skip
    inf.add_argument("--tile", type=int, nargs="+", help="tile core size (one or per axis)")
    inf.add_argument("--max-memory", help="choose the tile from a budget, e.g. 2GB")
    inf.add_argument("--output-type", default="labels",
                     choices=["labels", "probabilities", "logits"])  # fmt: skip
    inf.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    inf.add_argument("--device", default="cpu", help="cpu or cuda")
    inf.add_argument("--preview", help="write a downsampled overlay PNG here")
    inf.add_argument("--no-progress", action="store_true", help="no progress bar")
    inf.set_defaults(run=_infer)
    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="write synthetic ellipses/ellipsoids to disk")
    synth.add_argument("out", help="output path (must not exist)")
    synth.add_argument("--format", default="zarr", choices=["zarr", "tiff", "msd"])
    synth.add_argument("--shape", type=int, nargs="+", default=[256, 256],
                       help="2 or 3 sides, e.g. --shape 96 96 64")  # fmt: skip
    synth.add_argument("--num-images", type=int, default=16)
    synth.add_argument("--num-classes", type=int, default=3)
    synth.add_argument("--in-channels", type=int, default=1)
    synth.add_argument("--noise", type=float, default=0.4)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scanner", action="store_true", help="raw intensities and a real "
                       "geometry: MRI-like values in a 0.9x0.9x2.5 mm affine (msd), uint16 "
                       "bands georeferenced in UTM 33N (tiff)")  # fmt: skip
    synth.set_defaults(run=_data_synth)
    evaluate_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    tune_cli.add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    bsub = bench.add_subparsers(dest="benchmark", required=True)
    spatial = bsub.add_parser("spatial", help="memory, time and communication of decomposition")
    spatial.add_argument("--scenario", nargs="+", default=["2d-1024", "3d-128"])
    spatial.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    spatial.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    spatial.add_argument("--allocator", nargs="+", default=["default", "neutral"],
                         choices=["default", "neutral"])  # fmt: skip
    _output_args(spatial)
    spatial.set_defaults(run=_bench_spatial)
    btrain = bsub.add_parser("train", help="training throughput of the demo task, 1/2/4 ranks")
    btrain.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], choices=[1, 2, 4])
    btrain.add_argument("--steps", type=int, default=12, help="training steps per run")
    btrain.add_argument("--size", type=int, default=256, help="image side")
    btrain.add_argument("--allocator", nargs="+", default=["default", "neutral"],
                        choices=["default", "neutral"])  # fmt: skip
    _output_args(btrain)
    btrain.set_defaults(run=_bench_train)
    binfer = bsub.add_parser("infer", help="tiled inference vs whole image vs MONAI")
    binfer.add_argument("--scenario", nargs="+", default=["2d-8192", "3d-256"])
    binfer.add_argument("--threads", type=int, default=1, help="torch threads per run")
    binfer.add_argument("--allocator", default="default", choices=["default", "neutral"])
    _output_args(binfer)
    binfer.set_defaults(run=_bench_infer)
    bmem = bsub.add_parser("memory", help="memory model: predicted vs measured peak memory")
    bmem.add_argument("--device", default="cpu", help="cpu or cuda")
    bmem.add_argument("--scale", type=int, default=1, help="multiply every image side")
    bmem.add_argument("--only", nargs="+", help="configurations whose name contains these")
    bmem.add_argument("--swap-gpu-json", help="instead, predict the GPU peaks measured by "
                      "benchmarks/swap_gpu.py (its --json file)")  # fmt: skip
    _output_args(bmem)
    bmem.set_defaults(run=_bench_memory)
    tune_cli.add_bench_parser(bsub)
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
