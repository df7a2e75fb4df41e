"""Layer-wise execution against plain execution and against overlapping tiles.

For a 3-D U-Net (the small preset, InstanceNorm by default) on cubes of two sizes: the time
of one inference, layer by layer over blocks and plain (``model(x)``), side by side in one
process (medians of interleaved repeats); the peak of the tensors the computation holds
(counted op by op, allocator-neutral: the plain forward's activations, the layer-wise
executor's blocks with its host store counted apart); and the redundant work: convolution
FLOPs (``torch.utils.flop_counter``'s formula) against the plain forward's, for the executor
and for tiled inference with the receptive-field halo and the same core (the tiles' FLOPs
counted on the meta device).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_backward_flop, conv_flop_count

from haloseg.inference.receptive import receptive_field
from haloseg.inference.tiles import plan_tiles
from haloseg.layerwise import LayerwiseExecutor, MemoryStore
from haloseg.memory.planner import tiled_redundancy
from haloseg.memory.tracker import LiveBytes
from haloseg.models import unet_preset

__all__ = [
    "UncountedStore",
    "markdown",
    "run_layerwise_benchmark",
    "run_training_benchmark",
    "training_markdown",
]

log = logging.getLogger(__name__)

MIB = 2**20


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return unet_preset("small", spatial_dims=3, in_channels=1, out_channels=2, norm=norm).eval()


class UncountedStore(MemoryStore):
    """The executor's host store, left out of the compute count (reported on its own)."""

    def __init__(self, meter: LiveBytes) -> None:
        super().__init__()
        self.meter = meter

    def create(self, *args: Any) -> None:
        with self.meter.ignoring():
            super().create(*args)

    def zeros(self, *args: Any) -> None:
        with self.meter.ignoring():
            super().zeros(*args)


class _ConvFlops(TorchDispatchMode):
    """Convolution FLOPs, forward and backward (PyTorch's own formulas; the executor's
    oneDNN calls, forward and as backward, counted as the convolutions they are), of the ops
    on one device type: the
    executor's trace runs the network on the meta device too, which is not work."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device, self.flops = device, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):  # noqa: ANN204
        out = func(*args, **(kwargs or {}))
        if args and isinstance(args[0], torch.Tensor) and args[0].device.type == self.device:
            if func is torch.ops.aten.convolution.default:
                self.flops += conv_flop_count(args[0].shape, args[1].shape, out.shape, args[6])
            elif func is torch.ops.aten.mkldnn_convolution.default:  # blocks' oneDNN calls
                self.flops += conv_flop_count(args[0].shape, args[1].shape, out.shape, False)
            elif func is torch.ops.aten.convolution_backward.default:
                self.flops += conv_backward_flop(*args, out_val=out)
        return out


def _flops(run: Any, device: str = "cpu") -> int:
    with torch.no_grad(), _ConvFlops(device) as counter:
        run()
    return counter.flops


def _meta_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(shape, device="meta")
    return _flops(lambda: meta(x), "meta")


def _plain_peak(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        model(x)
    return meter.peak


def _layerwise_counts(model: nn.Module, x: torch.Tensor, block: int) -> dict[str, Any]:
    """Compute peak, store peak and voxel redundancy of one metered run; FLOPs of another."""
    with LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        ex = LayerwiseExecutor(model, block=block, store=UncountedStore(meter))
        ex.run(x)
    flops = _flops(lambda: LayerwiseExecutor(model, block=block).run(x))
    return {"compute_peak": meter.peak, "store_peak": ex.report.peak_store_bytes,
            "voxel_redundancy": ex.report.redundancy, "flops": flops}  # fmt: skip


def _tiles(model: nn.Module, norm: str, size: int, block: int) -> dict[str, Any]:
    """Tiled inference with the receptive-field halo and ``block`` cores: FLOPs counted."""
    # Tiles are exact only for local layers: the halo is that of the same network with its
    # normalisation local (the layers and their geometry are the same).
    local = _model("batch") if norm in ("instance", "group") else model
    rf = receptive_field(local, 3)
    shapes = Counter(t.shape for t in plan_tiles((size,) * 3, (block,) * 3, rf))
    flops = sum(n * _meta_flops(local, (1, 1, *s)) for s, n in shapes.items())
    return {"halo": rf.halo[0], "tiles": sum(shapes.values()), "tile_flops": flops,
            "tiled_formula": tiled_redundancy((block,) * 3, rf.halo)}  # fmt: skip


def _time(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _one_size(model: nn.Module, norm: str, size: int, block: int, repeats: int) -> dict:
    torch.manual_seed(1)
    x = torch.randn(1, 1, size, size, size)
    plain_flops = _meta_flops(model, tuple(x.shape))
    counts = _layerwise_counts(model, x, block)
    tiles = _tiles(model, norm, size, block)
    plain_s, layer_s = [], []
    with torch.no_grad():
        model(x)  # warm-up of both paths' kernels
    for _ in range(repeats):  # interleaved: both see the same machine
        with torch.no_grad():
            plain_s.append(_time(lambda: model(x)))
        layer_s.append(_time(lambda: LayerwiseExecutor(model, block=block).run(x)))
    row = {
        "size": size, "voxels": size**3, "block": block, "norm": norm,
        "plain_s": statistics.median(plain_s), "layerwise_s": statistics.median(layer_s),
        "plain_peak_mib": _plain_peak(model, x) / MIB,
        "compute_peak_mib": counts["compute_peak"] / MIB,
        "store_peak_mib": counts["store_peak"] / MIB,
        "voxel_redundancy": counts["voxel_redundancy"],
        "flop_redundancy": counts["flops"] / plain_flops,
        "halo": tiles["halo"], "tiles": tiles["tiles"],
        "tiled_formula": tiles["tiled_formula"],
        "tiled_flop_redundancy": tiles["tile_flops"] / plain_flops,
    }  # fmt: skip
    row["time_ratio"] = row["layerwise_s"] / row["plain_s"]
    log.info("%d^3: plain %.2f s, layer-wise %.2f s", size, row["plain_s"], row["layerwise_s"])
    return row


def _over_sizes(one: Any, sizes: list[int], block: int, repeats: int, threads: int,
                norm: str) -> list[dict[str, Any]]:  # fmt: skip
    """``one(model, norm, size, block, repeats)`` per cube side; growth relative to the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(norm)
        rows = [one(model, norm, s, block, repeats) for s in sizes]
    finally:
        torch.set_num_threads(before)
    for r in rows:
        r["threads"] = threads
        r["compute_growth"] = r["compute_peak_mib"] / rows[0]["compute_peak_mib"]
        r["plain_growth"] = r["plain_peak_mib"] / rows[0]["plain_peak_mib"]
    return rows


def run_layerwise_benchmark(sizes: list[int], block: int, repeats: int, threads: int,
                            norm: str = "instance") -> list[dict[str, Any]]:  # fmt: skip
    """One inference row per cube side in ``sizes``."""
    return _over_sizes(_one_size, sizes, block, repeats, threads, norm)


def _train_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    model(x).backward(grad)
    model.zero_grad(set_to_none=True)


def _layerwise_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, block: int,
                    store: Any = "memory") -> LayerwiseExecutor:  # fmt: skip
    ex = LayerwiseExecutor(model, block=block, store=store)
    ex.forward(x)
    ex.backward(grad)
    model.zero_grad(set_to_none=True)
    return ex


def _one_training_size(model: nn.Module, norm: str, size: int, block: int,
                       repeats: int) -> dict[str, Any]:  # fmt: skip
    """One training step (forward, backward, the output's gradient given) plain and
    layer-wise: time, compute peak (the plain step's saved activations included; the
    executor's host store apart), store peak and convolution FLOPs."""
    torch.manual_seed(1)
    model.train()
    x = torch.randn(1, 1, size, size, size)
    grad = torch.randn(1, 2, size, size, size)
    with LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        _train_step(model, x, grad)
    plain_peak = meter.peak
    with LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        ex = _layerwise_step(model, x, grad, block, UncountedStore(meter))
    with _ConvFlops("cpu") as counter:
        _train_step(model, x, grad)
    plain_flops = counter.flops
    with _ConvFlops("cpu") as counter:
        _layerwise_step(model, x, grad, block)
    plain_s, layer_s = [], []
    for _ in range(repeats):  # interleaved: both see the same machine
        plain_s.append(_time(lambda: _train_step(model, x, grad)))
        layer_s.append(_time(lambda: _layerwise_step(model, x, grad, block)))
    row = {
        "size": size, "voxels": size**3, "block": block, "norm": norm, "mode": "train",
        "plain_s": statistics.median(plain_s), "layerwise_s": statistics.median(layer_s),
        "plain_peak_mib": plain_peak / MIB, "compute_peak_mib": meter.peak / MIB,
        "store_peak_mib": ex.report.peak_store_bytes / MIB,
        "flop_redundancy": counter.flops / plain_flops,
    }  # fmt: skip
    row["time_ratio"] = row["layerwise_s"] / row["plain_s"]
    log.info("train %d^3: plain %.2f s, layer-wise %.2f s", size, row["plain_s"],
             row["layerwise_s"])  # fmt: skip
    return row


def run_training_benchmark(sizes: list[int], block: int, repeats: int, threads: int,
                           norm: str = "instance") -> list[dict[str, Any]]:  # fmt: skip
    """One training-step row per cube side in ``sizes``."""
    return _over_sizes(_one_training_size, sizes, block, repeats, threads, norm)


def training_markdown(rows: list[dict[str, Any]]) -> str:
    """Training-step rows as the Markdown table of docs/benchmarks.md."""
    head = ("| image | block | plain step s | layer-wise step s | ÷ plain | plain peak MiB "
            "(growth) | layer-wise compute peak MiB (growth) | host store peak MiB | "
            "FLOPs ÷ plain |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['size']}³ | {r['block']}³ | {r['plain_s']:.2f} | {r['layerwise_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['plain_peak_mib']:.0f} ({r['plain_growth']:.2f}×) | "
            f"{r['compute_peak_mib']:.1f} ({r['compute_growth']:.2f}×) | "
            f"{r['store_peak_mib']:.0f} | {r['flop_redundancy']:.3f} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as the Markdown table of docs/benchmarks.md."""
    head = ("| image | block | plain s | layer-wise s | ÷ plain | plain peak MiB (growth) | "
            "layer-wise compute peak MiB (growth) | host store peak MiB | FLOPs ÷ plain | "
            "tiles (halo) | tiles FLOPs ÷ plain |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        side = r["size"]
        lines.append(
            f"| {side}³ | {r['block']}³ | {r['plain_s']:.2f} | {r['layerwise_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['plain_peak_mib']:.0f} ({r['plain_growth']:.2f}×) | "
            f"{r['compute_peak_mib']:.1f} ({r['compute_growth']:.2f}×) | "
            f"{r['store_peak_mib']:.0f} | {r['flop_redundancy']:.3f} | "
            f"{r['tiles']} ({r['halo']}) | {r['tiled_flop_redundancy']:.1f} |"
        )
    return "\n".join(lines)
