"""``haloseg evaluate``: Dice and HD95 of predicted label maps against ground truth."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from haloseg.evaluation import (
    EvaluationResult,
    EvaluationSettings,
    evaluate,
    load_run_settings,
    write_csv,
    write_json,
)

__all__ = ["add_parser", "region_arg", "results_table"]


def region_arg(text: str) -> tuple[str, list[int]]:
    """``"WT=1,2,3"`` -> ("WT", [1, 2, 3])."""
    name, sep, values = text.partition("=")
    try:
        labels = [int(v) for v in values.split(",")]
    except ValueError:
        labels = []
    if not sep or not name or not labels:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=LABELS like WT=1,2,3")
    return name, labels


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice and HD95 of predictions against labels")
    p.add_argument("pred", metavar="PRED", help="prediction file or folder: .nii(.gz), .tif(f), "
                   ".npy or .zarr")  # fmt: skip
    p.add_argument("labels", metavar="LABELS", help="label file or folder (cases matched by name)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="classes incl. background (default: 1 + the largest label)")  # fmt: skip
    p.add_argument("--regions", type=region_arg, nargs="+", action="extend", metavar="NAME=L,L",
                   help="unions of labels scored like classes, e.g. WT=1,2,3 TC=1,3 "
                   "(replace the run's)")  # fmt: skip
    p.add_argument("--ignore-label", type=int, metavar="L",
                   help="label value left out of every metric")  # fmt: skip
    # dest is not "run": main() calls ``args.run``, the command's function.
    p.add_argument("--run", dest="run_folder", metavar="RUN_FOLDER",
                   help="run folder: read classes, names, regions, ignore label")  # fmt: skip
    p.add_argument("--csv", metavar="FILE", help="write one row per case and the mean here")
    p.add_argument("--json", metavar="FILE", help="write the cases and the mean here")
    p.set_defaults(run=_evaluate)


def _settings(args: argparse.Namespace) -> EvaluationSettings:
    """The run's settings (if any), replaced by the flags given."""
    settings = load_run_settings(args.run_folder) if args.run_folder else EvaluationSettings()
    flags = {"num_classes": args.num_classes, "ignore_label": args.ignore_label,
             "regions": dict(args.regions) if args.regions else None}  # fmt: skip
    return replace(settings, **{k: v for k, v in flags.items() if v is not None})


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    settings = _settings(args)
    with Progress("[bold]evaluate", BarColumn(), MofNCompleteColumn(), "cases",
                  console=console, transient=True,
                  disable=not console.is_terminal) as bar:  # fmt: skip
        task = bar.add_task("evaluate", total=None)
        result = evaluate(
            args.pred, args.labels, num_classes=settings.num_classes, regions=settings.regions,
            ignore_label=settings.ignore_label, label_names=settings.label_names,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    console.print(results_table(result))
    for path, write in ((args.csv, write_csv), (args.json, write_json)):
        if path:
            console.print(f"wrote {write(result, path)}")


def results_table(result: EvaluationResult) -> Table:
    """One row per case, then the mean; "—" where a value is undefined."""
    table = Table(title=f"Dice and HD95 ({result.units}) per case")
    table.add_column("case")
    for key in result.mean:
        kind, stem = key.split("_", 1)
        name = result.names.get(stem, stem)
        table.add_column(f"Dice {name}" if kind == "dice" else f"HD95 {name} ({result.units})",
                         justify="right")  # fmt: skip
    for case, values in result.cases.items():
        table.add_row(case, *(_cell(k, v) for k, v in values.items()))
    table.add_section()
    table.add_row("mean", *(_cell(k, v) for k, v in result.mean.items()), style="bold")
    return table


def _cell(key: str, value: float) -> str:
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}" if key.startswith("dice_") else f"{value:.2f}"
