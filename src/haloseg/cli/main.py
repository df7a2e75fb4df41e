"""Entry point of the ``haloseg`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from haloseg.cli import bench as bench_cli
from haloseg.cli import evaluate as evaluate_cli
from haloseg.cli import infer as infer_cli
from haloseg.cli import plan as plan_cli
from haloseg.cli import tune as tune_cli
from haloseg.errors import HalosegError

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
    from haloseg.config import load_config
    from haloseg.training import train

    cfg = load_config(args.config, args.overrides)
    if args.plan:
        plan_cli.plan_run(cfg, console)
        return
    metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
    if metrics["rank"] == 0:
        dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("dice_"))
        console.print(f"step {metrics['steps']}: validation Dice {dice}")
        console.print(f"outputs: {cfg.output_dir}/")


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
    infer_cli.add_parser(sub)
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
    bench_cli.add_parser(sub)
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
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Close a process group a command opened under torchrun (``haloseg train`` and ``infer``
    open one): left open, gloo's threads can abort the process as the interpreter exits."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
