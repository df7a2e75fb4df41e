"""``haloseg plan``: layer-wise execution on one device (every image whole, node by node over
blocks, each node's output in a host store) priced per block, for a training step and for
inference; and ``haloseg train --plan`` with ``memory.executor: layerwise``."""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from haloseg.config import RunConfig
from haloseg.errors import ConfigError
from haloseg.layerwise.budget import (
    MARGIN,
    block_bytes,
    block_for_budget,
    link_bytes,
    parameter_bytes,
    store_bytes,
)
from haloseg.layerwise.graph import plan_steps
from haloseg.units import GIB, format_bytes, parse_bytes

__all__ = ["add_layerwise_args", "check_layerwise_args", "plan_layerwise", "plan_run_layerwise"]

DEFAULT_BLOCKS = (32, 64, 128)
_RUN_BLOCK = 64  # a run's block without memory.block or memory.device_memory, as it trains
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp64": torch.float64}  # fmt: skip


def add_layerwise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layerwise-block", type=int, nargs="+", metavar="N",
                   help="price layer-wise execution at these blocks (voxels per side) instead "
                   f"of {', '.join(map(str, DEFAULT_BLOCKS))}")  # fmt: skip


def check_layerwise_args(args: argparse.Namespace) -> None:
    """Refuse a block below one voxel before anything is planned."""
    blocks = args.layerwise_block or []
    if blocks and min(blocks) < 1:
        raise ConfigError(f"--layerwise-block {' '.join(map(str, blocks))}: every block must "
                          "be >= 1 voxels per side, e.g. --layerwise-block 64 128")  # fmt: skip


@dataclass(frozen=True)
class _Row:
    """One block's costs: device bytes (parameters included), host store bytes, and the
    bytes over the host link in one training step."""

    block: tuple[int, ...]
    source: str
    blocks: int
    device_train: int
    device_infer: int
    store_train: int
    store_infer: int
    link_train: int


def _dtype_of(model: torch.nn.Module) -> torch.dtype | None:
    first = next(model.parameters(), None)
    return first.dtype if first is not None else None


class _Pricing:
    """One network on one image shape (N, C, *spatial), in training and in inference."""

    def __init__(self, model: torch.nn.Module, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.model, self.shape, self.dtype = model, tuple(shape), dtype
        self.image = list(shape[2:])
        # Activations in ``dtype``; the weights stay in their own (fp32 under bf16 autocast).
        traced = model if _dtype_of(model) == dtype else copy.deepcopy(model).to(dtype)
        # Training and evaluation trace apart: BatchNorm in eval mode is pointwise.
        self.train = plan_steps(traced.train(), shape, dtype)
        self.infer = plan_steps(traced.eval(), shape, dtype)
        traced.train()
        self.store_train = store_bytes(self.train, train=True)
        self.store_infer = store_bytes(self.infer)

    def row(self, block: Sequence[int], source: str) -> _Row:
        block = tuple(min(b, n) for b, n in zip(block, self.image, strict=True))
        blocks = math.prod(-(-n // b) for n, b in zip(self.image, block, strict=True))
        return _Row(
            block, source, blocks,
            block_bytes(self.train, block, self.image, train=True)
            + parameter_bytes(self.model, train=True),
            block_bytes(self.infer, block, self.image) + parameter_bytes(self.model),
            self.store_train, self.store_infer,
            link_bytes(self.train, block, self.image, train=True),
        )  # fmt: skip

    def budget_block(self, budget: int, flag: str, *, align: int) -> tuple[int, ...]:
        """The block (fewest per image) whose training step fits ``budget``, of ``align``
        multiples; ConfigError naming ``flag`` when none does."""
        return block_for_budget(self.model, self.shape, self.dtype, budget, align=align,
                                train=True, steps=self.train, flag=flag)  # fmt: skip


def _size(nbytes: float) -> str:
    return format_bytes(nbytes, "GiB", 2) if nbytes >= GIB else format_bytes(nbytes, "MiB")


def _table(console: Console, title: str, rows: list[_Row], budget: int | None) -> None:
    table = Table(title=title)
    for col in ("block", "blocks", "device train", "device infer", "host train", "host infer",
                "link per step", "fits"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        fits = "-" if budget is None else "yes" if r.device_train <= MARGIN * budget else "no"
        table.add_row(
            f"{'x'.join(map(str, r.block))}{r.source}", str(r.blocks), _size(r.device_train),
            _size(r.device_infer), _size(r.store_train), _size(r.store_infer),
            _size(r.link_train), fits,
        )  # fmt: skip
    console.print(table)


def _use(block: Sequence[int]) -> str:
    return f"memory.executor=layerwise memory.block=[{', '.join(map(str, block))}]"


def plan_layerwise(args: argparse.Namespace, console: Console) -> None:
    """The table of layer-wise costs at the default (or ``--layerwise-block``) blocks and at
    the block of the fewest blocks within ``--device-memory``, and the config that uses it."""
    from haloseg.models import UNet

    check_layerwise_args(args)
    chosen = args.layerwise_block or list(DEFAULT_BLOCKS)
    budget = parse_bytes(args.device_memory)
    n = len(args.image)
    with torch.device("meta"):
        model = UNet(spatial_dims=n, in_channels=args.in_channels, out_channels=args.classes,
                     depth=args.depth, base_channels=args.channels,
                     convs_per_level=args.convs_per_level, norm=args.norm,
                     upsampling=args.upsampling)  # fmt: skip
    pricing = _Pricing(model, (args.batch, args.in_channels, *args.image), _DTYPES[args.dtype])
    rows: list[_Row] = []
    for b in chosen:
        row = pricing.row((b,) * n, "")
        if row.block not in [r.block for r in rows]:
            rows.append(row)
    best: tuple[int, ...] | None = None
    try:
        best = pricing.budget_block(budget, "--device-memory", align=model.downsampling_factor)
    except ConfigError as e:
        reason = str(e)
    if best is not None:
        rows.append(pricing.row(best, " (budget)"))
    _table(console, f"layer-wise on one device (train step / inference; device: "
           f"{_size(budget)}, fits = train step within {MARGIN:.0%} of it)", rows,
           budget)  # fmt: skip
    if best is None:
        console.print(f"[red]layer-wise: {reason}")
        return
    console.print(f"layer-wise, fewest blocks within {_size(budget)}: {_use(best)}")


def plan_run_layerwise(cfg: RunConfig, model: torch.nn.Module, image: Sequence[int],
                       in_channels: int, console: Console) -> None:  # fmt: skip
    """``haloseg train CONFIG --plan`` with ``memory.executor: layerwise``: the block, and the
    device and host bytes of a training step over it."""
    if cfg.train.freeze_norm:
        from haloseg.training.freeze import freeze_batch_norm

        freeze_batch_norm(model)
    dtype = getattr(torch, cfg.train.dtype)
    shape = (cfg.train.batch_size, in_channels, *image)
    pricing = _Pricing(model.to(dtype), shape, dtype)
    from haloseg.training.layerwise import configured_block

    block, source = configured_block(cfg, pricing.model, pricing.shape, dtype,
                                     steps=pricing.train)  # fmt: skip
    row = pricing.row(block, "")
    console.print(
        f"run {cfg.name!r}: layer-wise on one device, largest image "
        f"{'x'.join(map(str, image))}, batch {cfg.train.batch_size}, block "
        f"{'x'.join(map(str, row.block))} ({source}; {row.blocks} blocks per image), store "
        f"{cfg.memory.store}"
    )
    budget = parse_bytes(cfg.memory.device_memory) if cfg.memory.device_memory else None
    _table(console, "layer-wise on one device (train step / inference)", [row], budget)
    if budget is not None:
        verdict = "fits" if row.device_train <= MARGIN * budget else "does NOT fit"
        console.print(f"train step {verdict} in {_size(budget)} (within {MARGIN:.0%} of it)")
