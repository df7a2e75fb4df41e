"""The DistDL talk's figures for our U-Net: memory against image size and channels, and the
number of devices each size needs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from haloseg.memory.model import StepSpec, step_memory
from haloseg.memory.planner import plan
from haloseg.plots import pyplot, save_figure
from haloseg.units import GIB, format_bytes

__all__ = ["SIZES", "CHANNELS", "draw_figures"]

SIZES = (128, 256, 512, 1024)
CHANNELS = (8, 16, 32, 64)


def _with_channels(spec: StepSpec, base: int) -> StepSpec:
    ratio = spec.channels[1] / spec.channels[0] if len(spec.channels) > 1 else 2.0
    levels = tuple(int(round(base * ratio**lvl)) for lvl in range(len(spec.channels)))
    return replace(spec, channels=levels)


def _cube(spec: StepSpec, side: int) -> StepSpec:
    return replace(spec, image=(side,) * spec.spatial_dims)


_FEATURES = {"plain": ("none", False), "checkpointing": ("none", True),
             "swap all": ("all", False), "swap all + checkpointing": ("all", True)}  # fmt: skip


def draw_figures(spec: StepSpec, device_memory: int, folder: Path) -> list[Path]:
    """Write memory-vs-size.png, memory-vs-channels.png and devices-needed.png."""
    folder.mkdir(parents=True, exist_ok=True)
    side = SIZES[-1]
    figures = {
        "memory-vs-size.png": lambda ax: _memory_lines(
            ax, SIZES, lambda s: _cube(spec, s), device_memory, "image side (voxels per dim)",
            f"one device, {spec.channels[0]} channels",
        ),
        "memory-vs-channels.png": lambda ax: _memory_lines(
            ax, CHANNELS, lambda c: _with_channels(_cube(spec, side), c), device_memory,
            "channels at level 0", f"one device, {side}^{spec.spatial_dims} image",
        ),
        "devices-needed.png": lambda ax: _devices_bars(ax, spec, device_memory),
    }  # fmt: skip
    paths = []
    for name, draw in figures.items():
        fig, ax = pyplot().subplots(figsize=(6, 4))
        draw(ax)
        paths.append(folder / name)
        save_figure(fig, paths[-1])
    return paths


def _memory_lines(ax: Any, xs: tuple[int, ...], spec_at: Callable[[int], StepSpec],
                  device_memory: int, xlabel: str, title: str) -> None:  # fmt: skip
    """Peak memory of one device against ``xs``, with and without the memory savers."""
    for label, (swap, ckpt) in _FEATURES.items():
        gib = [step_memory(replace(spec_at(x), swap=swap, checkpoint=ckpt)).peak / GIB
               for x in xs]  # fmt: skip
        ax.plot(xs, gib, marker="o", label=label)
    ax.axhline(device_memory / GIB, color="black", linestyle="--", linewidth=1,
               label=f"{format_bytes(device_memory, 'GB', 0)} device")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("peak memory per device (GiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _devices_bars(ax: Any, spec: StepSpec, device_memory: int) -> None:
    """Devices a spatial grid alone needs, per image size and channel count."""
    width = 0.8 / len(CHANNELS)
    for k, c in enumerate(CHANNELS):
        needed = []
        for s in SIZES:
            rows = plan(_with_channels(_cube(spec, s), c), device_memory, swaps=("none",))
            plain = [r for r in rows if r.fits and not r.mix.checkpoint]
            needed.append(plain[0].mix.devices if plain else math.nan)
        xs = [i + (k - (len(CHANNELS) - 1) / 2) * width for i in range(len(SIZES))]
        ax.bar(xs, needed, width, label=f"{c} channels")
    ax.set_xticks(range(len(SIZES)), [f"{s}^{spec.spatial_dims}" for s in SIZES])
    ax.set_yscale("log", base=2)
    ax.set_ylabel(f"devices of {format_bytes(device_memory, 'GB', 0)} (spatial grid)")
    ax.set_title("devices needed to train one image, no swapping or checkpointing")
    ax.legend(fontsize=8)
