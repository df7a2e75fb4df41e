"""``haloseg plan --pipeline N``: the automatic balance of N pipeline stages for a U-Net and
an image, with the bubble and memory it predicts, against an even split of the blocks."""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from haloseg.config import RunConfig
from haloseg.errors import ConfigError
from haloseg.pipeline.balance import (
    StagePlan,
    even_split,
    measure_blocks,
    partition,
    plan_stages,
    probe_scale,
)
from haloseg.units import format_bytes, parse_bytes

__all__ = ["add_pipeline_args", "plan_pipeline", "plan_run_stages"]


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pipeline",
        type=int,
        metavar="N",
        help="also balance the U-Net's blocks over N pipeline stages (measured here)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        help="micro-batches per step of the pipeline (default: the batch)",
    )
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"],
                   help="pipeline schedule: in-flight micro-batches per stage")  # fmt: skip
    p.add_argument("--memory-cap", help="largest memory of one stage, e.g. 40GB "
                   "(default: --device-memory)")  # fmt: skip


def _unet(args: argparse.Namespace) -> torch.nn.Module:
    from haloseg.models import UNet

    return UNet(spatial_dims=len(args.image), in_channels=args.in_channels,
                out_channels=args.classes, depth=args.depth, base_channels=args.channels,
                convs_per_level=args.convs_per_level, norm=args.norm,
                upsampling=args.upsampling)  # fmt: skip


def plan_pipeline(args: argparse.Namespace, console: Console) -> tuple[StagePlan, StagePlan]:
    """Measure the blocks on this machine, balance them, print and return (balanced, even)."""
    from haloseg.pipeline import unet_blocks

    stages, m = args.pipeline, args.microbatches or args.batch
    if stages < 1 or m < 1 or args.batch % m:
        raise ConfigError(
            f"--pipeline={stages} --microbatches={m} --batch={args.batch}: need at least one "
            "stage and a number of micro-batches that divides --batch"
        )
    cap = parse_bytes(args.memory_cap or args.device_memory)
    model = _unet(args)
    seq = unet_blocks(model)
    align = model.downsampling_factor
    example = torch.empty(args.batch // m, args.in_channels, *args.image)
    probe, _ = probe_scale(args.image, align)
    console.print(
        f"measuring {len(seq)} blocks on this machine's CPU ({torch.get_num_threads()} threads)"
        f" on a {'x'.join(map(str, probe))} probe, scaled to {'x'.join(map(str, args.image))}"
    )
    costs = measure_blocks(seq, example, align=align)
    kw = {"microbatches": m, "schedule": args.schedule}
    balanced = plan_stages(costs, partition(costs, stages, memory_cap=cap, **kw), **kw)
    even = plan_stages(costs, even_split(len(costs), stages), **kw)
    _stage_table(console, balanced, cap)
    console.print(
        f"balanced: slowest stage {balanced.slowest_over_mean:.3f}x the mean, bubble "
        f"{balanced.bubble:.1%}, predicted {balanced.speedup:.2f}x one stage over {m} "
        f"micro-batches ({args.schedule}); an even split of the blocks {list(even.sizes)}: "
        f"{even.slowest_over_mean:.3f}x, bubble {even.bubble:.1%}, {even.speedup:.2f}x"
    )
    console.print(f"use it: parallel.pipeline={stages} parallel.microbatches={m} "
                  f"parallel.balance=[{', '.join(map(str, balanced.sizes))}]")  # fmt: skip
    return balanced, even


def plan_run_stages(
    cfg: RunConfig, model: torch.nn.Module, block: tuple[int, ...], in_channels: int,
    console: Console,
) -> None:  # fmt: skip
    """``haloseg train CONFIG --plan`` with ``parallel.pipeline``: the stages' balance (the
    configured one, or measured here as the run would) and memory on one rank's block."""
    from haloseg.pipeline import unet_blocks

    p, t = cfg.parallel, cfg.train
    m = p.microbatches or t.batch_size
    seq = unet_blocks(model)
    example = torch.empty(t.batch_size // m, in_channels, *block)
    costs = measure_blocks(seq, example, align=model.downsampling_factor)
    cap = parse_bytes(cfg.memory.device_memory) if cfg.memory.device_memory else None
    kw = {"microbatches": m, "schedule": p.schedule}
    sizes = p.balance or partition(costs, p.pipeline, memory_cap=cap, **kw)
    if sum(sizes) != len(seq):
        raise ConfigError(
            f"parallel.balance={list(sizes)} gives {sum(sizes)} blocks but the network has "
            f"{len(seq)}; give blocks per stage adding up to {len(seq)}"
        )
    plan = plan_stages(costs, sizes, **kw)
    _stage_table(console, plan, cap)
    console.print(
        f"{'given' if p.balance else 'balanced'} split {list(plan.sizes)}: slowest stage "
        f"{plan.slowest_over_mean:.3f}x the mean, bubble {plan.bubble:.1%}, predicted "
        f"{plan.speedup:.2f}x one stage over {m} micro-batches ({p.schedule}); memory per "
        "stage counts saved activations, received tuples and weights with AdamW's state"
    )


def _stage_table(console: Console, plan: StagePlan, cap: int | None) -> None:
    limit = f" (memory cap {format_bytes(cap)})" if cap is not None else ""
    table = Table(title=f"{len(plan.sizes)} pipeline stages{limit}")
    for col in ("stage", "blocks", "first", "last", "time share", "memory"):
        table.add_column(col, justify="right")
    total = sum(plan.seconds)
    for s, (k, a, b, t, mem) in enumerate(zip(plan.sizes, plan.first, plan.last, plan.seconds,
                                               plan.memory, strict=True)):  # fmt: skip
        table.add_row(str(s), str(k), a, b, f"{t / total:.1%}", format_bytes(mem, digits=2))
    console.print(table)
