"""``haloseg infer``: exact inference of an image file, a folder of them or a Decathlon test
list, with a progress bar of the tiles."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from haloseg.units import parse_bytes

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``haloseg infer`` on the command's subparsers."""
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
    inf.add_argument("--max-memory", help="choose the tile from a budget, e.g. 2GB (with "
                     "--executor layerwise: the block, from the device's budget)")  # fmt: skip
    inf.add_argument("--executor", default="auto", choices=["auto", "layerwise"],
                     help="auto: tiles, or one whole-image forward for networks with global "
                     "statistics; layerwise: one whole-image forward in this process, layer "
                     "by layer over blocks")  # fmt: skip
    inf.add_argument("--block", type=int, nargs="+", help="block of --executor layerwise "
                     "(one size or per axis; default: from --max-memory)")  # fmt: skip
    inf.add_argument("--store", default="memory", help="where --executor layerwise keeps "
                     "every layer's output: memory (host) or a folder (zarr on disk)")  # fmt: skip
    inf.add_argument("--output-type", default="labels",
                     choices=["labels", "probabilities", "logits"])  # fmt: skip
    inf.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    inf.add_argument("--device", default="cpu", help="cpu or cuda")
    inf.add_argument("--preview", help="write a downsampled overlay PNG here")
    inf.add_argument("--no-progress", action="store_true", help="no progress bar")
    inf.set_defaults(run=_infer)


def _infer(args: argparse.Namespace, console: Console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

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
            executor=args.executor, block=args.block, store=args.store,
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
    if r["mode"] == "layerwise":
        block = "x".join(map(str, r["block"]))
        return f"{shape}, whole-image forward layer by layer over blocks of {block}{norm}"
    grid = "x".join(map(str, r["grid"]))
    return f"{shape}, whole-image forward over a {grid} grid of processes{norm}"
