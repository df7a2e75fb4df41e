"""Calibration of the memory model: predicted against measured peak memory of training steps.

Each configuration trains our U-Net for two steps (AdamW, the trainer's Dice +
cross-entropy) and measures the second: on CPU the bytes of live tensors counted op by op
(``LiveBytes``; the host copies of swapped activations left out, as they are not device
memory), on CUDA ``torch.cuda.max_memory_allocated``. Both add what is alive before the
step (weights, optimizer state, the batch), as the prediction does. Spatial grids run on
local gloo processes and report their largest rank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from haloseg.memory.model import StepSpec, step_memory
from haloseg.memory.planner import unet_spec
from haloseg.units import GIB, MIB

__all__ = [
    "CONFIGS",
    "Calibration",
    "markdown",
    "run_memory_benchmark",
    "swap_benchmark_rows",
]


@dataclass(frozen=True)
class Calibration:
    """One configuration: a U-Net, an image, and the memory features."""

    name: str
    image: tuple[int, ...]
    norm: str = "batch"
    upsampling: str = "transposed"
    channels: int = 8
    depth: int = 4
    batch: int = 1
    grid: tuple[int, ...] | None = None
    swap: str = "none"
    checkpoint: bool = False
    budget_mib: int = 0

    def spec(self, scale: int = 1) -> StepSpec:
        image = tuple(s * scale for s in self.image)
        spec = unet_spec(image=image, in_channels=1, classes=3, channels=self.channels,
                         depth=self.depth, norm=self.norm, upsampling=self.upsampling,
                         batch=self.batch)  # fmt: skip
        return replace(spec, grid=self.grid, swap=self.swap, checkpoint=self.checkpoint,
                       swap_budget=self.budget_mib * MIB)  # fmt: skip


CONFIGS = (
    Calibration("2d-256 batch", (256, 256), batch=2),
    Calibration("2d-512 group linear", (512, 512), norm="group", upsampling="linear"),
    Calibration(
        "2d-384 none nearest", (384, 384), norm="none", upsampling="nearest", channels=16
    ),  # fmt: skip
    Calibration("3d-64 batch", (64, 64, 64)),
    Calibration("3d-64 instance ckpt", (64, 64, 64), norm="instance", checkpoint=True),
    Calibration("2d-512 batch ckpt", (512, 512), checkpoint=True),
    Calibration("2d-512 batch swap all", (512, 512), swap="all"),
    Calibration("3d-64 batch swap skips", (64, 64, 64), swap="skips"),
    Calibration("2d-512 batch swap budget 16MiB", (512, 512), swap="budget", budget_mib=16),
    Calibration(
        "3d-64 group swap all + ckpt", (64, 64, 64), norm="group", swap="all", checkpoint=True
    ),  # fmt: skip
    Calibration("2d-512 batch grid 1x2", (512, 512), grid=(1, 2)),
    Calibration("2d-512 batch grid 2x2 ckpt", (512, 512), grid=(2, 2), checkpoint=True),
)


def _model(c: Calibration, device: torch.device) -> torch.nn.Module:
    from haloseg.models import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=len(c.image), in_channels=1, out_channels=3, depth=c.depth,
                 base_channels=c.channels, norm=c.norm, upsampling=c.upsampling)  # fmt: skip
    return model.to(device)


def measure(c: Calibration, device: str = "cpu", scale: int = 1) -> int:
    """Peak bytes of the second training step of ``c`` on this process (its block)."""
    import haloseg
    from haloseg.memory.checkpoint import checkpoint_levels
    from haloseg.memory.tracker import LiveBytes
    from haloseg.parallel.reduce import cross_entropy, soft_dice_loss

    dev = torch.device(device)
    grid = c.grid or (1,) * len(c.image)
    dec = haloseg.Decomposition(grid)
    model = _model(c, dev)
    haloseg.spatial_parallel(model, dec)
    if c.checkpoint:
        checkpoint_levels(model)
    swapper = _swapper(c, model)
    opt = torch.optim.AdamW(model.parameters())
    image = tuple(s * scale for s in c.image)
    block = dec.box(image)
    shape = (c.batch, *(b - a for a, b in block))
    peak = 0
    for _step in range(2):
        x = torch.randn(c.batch, 1, *shape[1:], device=dev)
        label = torch.randint(0, 3, shape, device=dev)
        valid = torch.ones(shape, dtype=torch.bool, device=dev)
        before = _alive(model, opt) + x.nbytes + label.nbytes + valid.nbytes
        tracker = LiveBytes(device=dev.type) if dev.type == "cpu" else contextlib.nullcontext()
        _leave_out_host_copies(swapper, tracker)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with tracker, swapper or contextlib.nullcontext():
            logits = model(x)
            loss = cross_entropy(logits, label, dec, valid=valid)
            loss = loss + soft_dice_loss(logits, label, dec, valid=valid)
            del logits
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = before + tracker.peak
    return peak


def _alive(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(p.nbytes for p in model.parameters()) + sum(t.nbytes for t in state)


def _swapper(c: Calibration, model: torch.nn.Module) -> Any:
    if c.swap == "none":
        return None
    from haloseg.memory.swap import ActivationSwapper

    return ActivationSwapper(model, policy=c.swap, budget=c.budget_mib * MIB or None)


def _leave_out_host_copies(swapper: Any, tracker: Any) -> None:
    """On CPU the host copies are CPU tensors too: allocate them untracked."""
    if swapper is None or not hasattr(tracker, "ignoring"):
        return
    out = type(swapper)._swap_out

    def swap_out(t: torch.Tensor) -> Any:
        with tracker.ignoring():
            return out(swapper, t)

    swapper._swap_out = swap_out


def _measure_worker(c: Calibration, device: str, scale: int) -> int:
    torch.set_num_threads(1)
    return measure(c, device, scale)


def run_memory_benchmark(
    configs: tuple[Calibration, ...] = CONFIGS, device: str = "cpu", scale: int = 1
) -> list[dict[str, Any]]:
    """Rows of (config, predicted MiB, measured MiB, ratio)."""
    from haloseg.parallel.spawn import run_distributed

    rows = []
    for c in configs:
        ranks = math.prod(c.grid) if c.grid else 1
        if ranks > 1:
            measured = max(run_distributed(_measure_worker, ranks, c, device, scale))
        else:
            measured = measure(c, device, scale)
        predicted = step_memory(c.spec(scale)).peak
        rows.append({
            "config": c.name, "image": "x".join(str(s * scale) for s in c.image),
            "device": device, "predicted_mib": predicted / MIB,
            "measured_mib": measured / MIB, "ratio": predicted / measured,
        })  # fmt: skip
    return rows


def swap_benchmark_rows(path: str) -> list[dict[str, Any]]:
    """Predictions for the GPU peaks that ``benchmarks/swap_gpu.py`` measured (its JSON):
    the 3-D ``large`` U-Net, fp32, plain cross-entropy, with each swap policy."""
    import json

    from haloseg.models import PRESETS

    data = json.loads(open(path).read())
    preset = PRESETS[data["preset"]]
    cap = int(data["device_memory_cap_gib"] * GIB)
    rows = []
    for r in data["largest"] + data["timing"]:
        spec = unet_spec(image=(r["edge"],) * 3, in_channels=1, classes=3,
                         channels=preset["base_channels"], depth=preset["depth"],
                         convs_per_level=preset["convs_per_level"])  # fmt: skip
        spec = replace(spec, loss="ce", swap=r["policy"], swap_budget=cap)
        predicted = step_memory(spec).peak
        measured = r["peak_gib"] * GIB
        rows.append({
            "config": f"3d large swap {r['policy']}", "image": f"{r['edge']}^3",
            "device": "cuda (H100)", "predicted_mib": predicted / MIB,
            "measured_mib": measured / MIB, "ratio": predicted / measured,
        })  # fmt: skip
    unique = {(r["config"], r["image"]): r for r in rows}
    return list(unique.values())


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | image | device | predicted MiB | measured MiB | predicted / measured |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['image']} | {r['device']} | {r['predicted_mib']:.1f} | "
            f"{r['measured_mib']:.1f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)
