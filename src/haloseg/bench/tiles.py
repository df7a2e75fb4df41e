"""Overlap-tile training against halo exchange, and the Summit scene as 64 tiles.

(a) One training step (forward, loss over the block, backward, gradient sum) of the small
U-Net without normalisation on a 2-D image, at equal process counts: halo exchange
(``spatial_parallel``: every rank its block, halos traded before each layer) against
overlapping tiles (the plain network on the block plus the receptive-field halo, nothing
exchanged inside it), and one process on the whole image for scale. Fresh processes of one
thread each; medians over the timed steps of the slowest rank; memory as the rise of the
resident set during a step.

(b) The Summit scene (Seal et al., ICPP 2020): a 10,000 x 10,000 4-band image as 8 x 8
tiles of about 1250² with the halo haloseg derives for the network. 64 processes do not fit
this machine, so one process runs the 64 tiles' forward and backward one after another and
accumulates their parameter gradients: exactly the sum the 64 processes' all-reduce forms.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.geometry import block_boxes
from haloseg.geometry.overlap import core_slices, tile_box
from haloseg.inference.receptive import receptive_field
from haloseg.memory.planner import unet_spec
from haloseg.memory.tiling import tile_spec, tiles
from haloseg.models import unet_preset
from haloseg.parallel import Decomposition, cross_entropy, spatial_parallel
from haloseg.parallel.gradients import GradientSum
from haloseg.parallel.spawn import run_distributed
from haloseg.resident import reset_peak, resident_kib

__all__ = ["markdown", "ratio_text", "run_scene_benchmark", "run_step_benchmark"]

log = logging.getLogger(__name__)

GRIDS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}
FORMAT = torch.channels_last  # the CPU's faster layout (the trainer's auto)


def _model(in_channels: int, classes: int, base: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = unet_preset("small", spatial_dims=2, in_channels=in_channels, out_channels=classes,
                        base_channels=base, norm="none")  # fmt: skip
    return model.to(memory_format=FORMAT).train()


def _step_worker(mode: str, size: int, grid: tuple[int, int], steps: int) -> dict[str, Any]:
    """One rank of ``mode`` (plain | halo | tiles): step times and memory."""
    model, shape = _model(1, 2, 8), (size, size)
    dec = Decomposition(grid)
    rf = receptive_field(model, 2)
    dec.align = rf.alignment
    core = dec.box(shape)
    read, keep = core, None
    if mode == "halo":
        net = spatial_parallel(model, dec)
    else:
        net = model
        if dec.size > 1:
            GradientSum(list(model.parameters()), dec)
        read = tile_box(core, rf.halo, shape)
        keep = (slice(None), slice(None), *core_slices(core, read))
    x = torch.randn(1, 1, *(hi - lo for lo, hi in read)).contiguous(memory_format=FORMAT)
    target = torch.randint(0, 2, (1, *(hi - lo for lo, hi in core)))
    times, peaks = [], []
    for step in range(steps + 1):
        if dec.size > 1:
            dist.barrier()
        net.zero_grad(set_to_none=True)
        reset_peak()
        base = resident_kib("VmRSS") or 0
        start = time.perf_counter()
        y = net(x)
        y = y if keep is None else y[keep]
        cross_entropy(y, target, dec).backward()
        elapsed = time.perf_counter() - start
        peak = ((resident_kib("VmHWM") or 0) - base) / 1024
        del y
        if step:  # the first step warms up caches and plans
            times.append(elapsed)
            peaks.append(peak)
    return {"step_s": statistics.median(times), "peak_mib": max(peaks),
            "input": [hi - lo for lo, hi in read]}  # fmt: skip


def run_step_benchmark(ranks: list[int], size: int, steps: int) -> list[dict[str, Any]]:
    """(a): one row per (mode, ranks), with one process on the whole image first."""
    rf = receptive_field(_model(1, 2, 8), 2)
    rows = []
    for mode, n in [("plain", 1)] + [(m, r) for r in ranks for m in ("halo", "tiles")]:
        log.info("%s on %d rank(s), %d²", mode, n, size)
        grid = GRIDS[n]
        out = run_distributed(_step_worker, n, mode, size, grid, steps, timeout=3600)
        worst = max(out, key=lambda r: r["step_s"])
        e = tiles((size, size), grid, rf.alignment, rf.halo)[1] if mode == "tiles" else 1.0
        rows.append({"part": "step", "mode": mode, "ranks": n, "grid": "x".join(map(str, grid)),
                     "size": size, "halo": rf.halo[0] if mode == "tiles" else 0,
                     "redundancy": e, "step_s": worst["step_s"],
                     "peak_mib": [round(r["peak_mib"], 1) for r in out],
                     "input": "x".join(map(str, worst["input"]))})  # fmt: skip
    plain = rows[0]
    for r in rows:
        r["speedup"] = plain["step_s"] / r["step_s"]
        same = [h for h in rows if h["mode"] == "halo" and h["ranks"] == r["ranks"]]
        r["time_vs_halo"] = r["step_s"] / same[0]["step_s"] if same else float("nan")
    return rows


def _scene_worker(scene: int, grid: int, base: int, limit: int | None) -> dict[str, Any]:
    """(b): every tile's forward and backward in turn, gradients accumulated."""
    bands, classes = 4, 6
    model = _model(bands, classes, base)
    rf = receptive_field(model, 2)
    side = -(-scene // rf.alignment) * rf.alignment  # padded as training pads
    shape = (side, side)
    cores = block_boxes(shape, (grid, grid), rf.alignment)[:limit]
    times, peaks, sizes = [], [], []
    model.zero_grad(set_to_none=True)
    for i, core in enumerate(cores):
        read = tile_box(core, rf.halo, shape)
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(1, bands, *(hi - lo for lo, hi in read), generator=gen)
        target = torch.randint(0, classes, (1, *(hi - lo for lo, hi in core)), generator=gen)
        x = x.contiguous(memory_format=FORMAT)
        keep = (slice(None), slice(None), *core_slices(core, read))
        reset_peak()
        base_kib = resident_kib("VmRSS") or 0
        start = time.perf_counter()
        # The whole scene's mean cross-entropy: each tile adds its core's share.
        loss = F.cross_entropy(model(x)[keep], target, reduction="sum") / math.prod(shape)
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append(((resident_kib("VmHWM") or 0) - base_kib) / 1024)
        sizes.append([hi - lo for lo, hi in read])
        log.info("tile %d/%d %s: %.1f s", i + 1, len(cores), sizes[-1], times[-1])
    grad_norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
    return {"halo": list(rf.halo), "alignment": rf.alignment, "radius": list(rf.radius),
            "times": times, "peaks": peaks, "sizes": sizes, "grad_norm": grad_norm}  # fmt: skip


def run_scene_benchmark(
    scene: int, grid: int, base: int, limit: int | None, threads: int
) -> list[dict[str, Any]]:
    """(b): one row for the scene's tiles."""
    (out,) = run_distributed(_scene_worker, 1, scene, grid, base, limit, timeout=7200,
                             threads=threads)  # fmt: skip
    largest, e = tiles((scene, scene), (grid, grid), out["alignment"], out["halo"])
    spec = unet_spec(image=(scene, scene), in_channels=4, classes=6, channels=base, depth=4,
                     norm="none", dtype="fp32")  # fmt: skip
    from haloseg.memory.model import step_memory

    predicted = step_memory(tile_spec(spec, largest)).peak / 2**20
    return [{"part": "scene", "scene": scene, "grid": f"{grid}x{grid}", "base_channels": base,
             "threads": threads, "halo": out["halo"][0], "radius": out["radius"][0][0],
             "alignment": out["alignment"], "redundancy": e,
             "largest_tile": "x".join(map(str, largest)), "tiles_run": len(out["times"]),
             "tile_s": statistics.median(out["times"]), "tile_s_min": min(out["times"]),
             "tile_s_max": max(out["times"]), "total_s": sum(out["times"]),
             "peak_mib": max(out["peaks"]), "predicted_mib": predicted,
             "grad_norm": out["grad_norm"]}]  # fmt: skip


def ratio_text(row: dict[str, Any]) -> str:
    """A row's step time over halo exchange's at its rank count, or a dash."""
    return "—" if math.isnan(row["time_vs_halo"]) else f"{row['time_vs_halo']:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown tables (the format of docs/benchmarks.md)."""
    lines = []
    steps = [r for r in rows if r["part"] == "step"]
    if steps:
        lines += ["| mode | ranks | grid | input per rank | halo | E | step s | speed-up "
                  "| time / halo exchange | step peak MiB per rank |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in steps:
            lines.append(
                f"| {r['mode']} | {r['ranks']} | {r['grid']} | {r['input']} | {r['halo']} | "
                f"{r['redundancy']:.3f} | {r['step_s']:.2f} | {r['speedup']:.2f} | "
                f"{ratio_text(r)} | {', '.join(f'{m:.0f}' for m in r['peak_mib'])} |"
            )
    for r in (r for r in rows if r["part"] == "scene"):
        lines += [
            "",
            "| scene | tiles | halo (radius) | largest tile | E | tiles run | "
            "s per tile (median, min-max) | total s | peak MiB (predicted) |",
            "|---|---|---:|---|---:|---:|---|---:|---|",
            f"| {r['scene']}² x 4 bands | {r['grid']} | {r['halo']} ({r['radius']}) | "
            f"{r['largest_tile']} | {r['redundancy']:.3f} | {r['tiles_run']} | "
            f"{r['tile_s']:.1f} ({r['tile_s_min']:.1f}-{r['tile_s_max']:.1f}) | "
            f"{r['total_s']:.0f} | {r['peak_mib']:.0f} ({r['predicted_mib']:.0f}) |",
        ]
    return "\n".join(lines).strip()
