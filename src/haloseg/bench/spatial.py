"""Spatial decomposition benchmark: per-rank peak memory, step time and communication.

Each configuration runs in fresh processes (one thread each): plain PyTorch on the
unmodified model in one process, and haloseg on 1, 2 and 4 ranks, each in contiguous and
channels-last memory format (weights and input; oneDNN's CPU convolutions are faster in the
latter, so plain PyTorch channels-last is the stronger baseline). Peak memory is the rise
of the resident set during a forward+backward step (peak reset through
``/proc/self/clear_refs``), measured with the default allocator and allocator-neutral
(glibc ``MALLOC_MMAP_THRESHOLD_=65536``: large tensors are returned to the OS when freed, so
the resident set tracks live tensors).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from haloseg.models import unet_preset
from haloseg.parallel import Decomposition, cross_entropy, spatial_parallel
from haloseg.parallel.spawn import run_distributed
from haloseg.parallel.timing import (
    comm_cpu_times,
    comm_times,
    late_waits,
    log_collectives,
    reset_comm_times,
)
from haloseg.resident import reset_peak, resident_kib

__all__ = ["SCENARIOS", "Result", "markdown", "report", "run_spatial_benchmark", "write_json"]

log = logging.getLogger(__name__)

SCENARIOS: dict[str, dict[str, Any]] = {
    "2d-128": {"shape": (128, 128), "grids": {2: (1, 2), 4: (2, 2)}},  # a quick check
    "2d-1024": {"shape": (1024, 1024), "grids": {2: (1, 2), 4: (2, 2)}},
    "3d-128": {"shape": (128, 128, 128), "grids": {2: (1, 1, 2), 4: (1, 2, 2)}},
}
NEUTRAL = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_FORMATS = ("contiguous", "channels_last")


def _memory_format(name: str, spatial_dims: int) -> torch.memory_format:
    if name == "contiguous":
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


@dataclass
class Result:
    """One configuration: medians over the timed steps, worst rank where per rank."""

    scenario: str
    mode: str
    ranks: int
    allocator: str
    step_s: float
    cpu_s: float
    """CPU time of the worst rank's process during the step (all its threads)."""
    peak_mib: float
    comm_s: dict[str, float] = field(default_factory=dict)
    comm_cpu_s: float = 0.0
    """CPU time of the worst rank's process inside communication calls."""
    late_wait_s: float = 0.0
    """The most time a rank spent in group-wide calls waiting for a rank that arrived later
    (load imbalance)."""
    transfer_s: float = 0.0
    """The most communication time of a rank without that waiting: the messages themselves.
    (Each of the two is a maximum over the ranks of its own.)"""
    cpu_spread: float = 0.0
    """The slowest rank's CPU time for the step ÷ the fastest's, minus one: how unequal the
    ranks' compute on equal blocks is."""
    memory_format: str = "contiguous"
    """Layout of the weights and the input: contiguous | channels_last."""


def _worker(
    scenario: str, grid: tuple[int, ...] | None, steps: int, memory_format: str = "contiguous"
) -> dict[str, Any]:
    shape = SCENARIOS[scenario]["shape"]
    fmt = _memory_format(memory_format, len(shape))
    torch.manual_seed(0)
    model = unet_preset("small", spatial_dims=len(shape), in_channels=1, out_channels=2)
    model.to(memory_format=fmt)
    if grid is None:
        net, local = model, shape
    else:
        dec = Decomposition(grid)
        net = spatial_parallel(model, dec)
        local = tuple(b - a for a, b in dec.box(shape))
    x = torch.randn(1, 1, *local).contiguous(memory_format=fmt)
    target = torch.randint(0, 2, (1, *local))
    times, cpus, peaks, comms, comm_cpus, lates, transfers = [], [], [], [], [], [], []
    for step in range(steps + 1):
        if grid is not None:
            dist.barrier()
        reset_comm_times()
        net.zero_grad(set_to_none=True)
        reset_peak()
        base = resident_kib("VmRSS")
        start, cpu = time.perf_counter(), time.process_time()
        with log_collectives() as calls:
            y = net(x)
            loss = F.cross_entropy(y, target) if grid is None else cross_entropy(y, target, dec)
            loss.backward()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = resident_kib("VmHWM") - base
        del y, loss
        late = 0.0
        if grid is not None:  # the ranks share one clock: they run on this machine
            logs: list[Any] = [None] * dec.size
            dist.all_gather_object(logs, calls, group=dec.group)
            late = late_waits(logs)[dec.rank]
        if step:  # the first step warms up caches and plans
            times.append(elapsed)
            cpus.append(cpu)
            peaks.append(peak / 1024)
            comms.append(comm_times())
            comm_cpus.append(sum(comm_cpu_times().values()))
            lates.append(late)
            transfers.append(sum(comms[-1].values()) - late)
    kinds = sorted({k for c in comms for k in c})
    return {
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpus),
        "peak_mib": max(peaks),
        "comm_s": {k: statistics.median(c.get(k, 0.0) for c in comms) for k in kinds},
        "comm_cpu_s": statistics.median(comm_cpus),
        "late_wait_s": statistics.median(lates),
        "transfer_s": statistics.median(transfers),
    }


def _config(
    scenario: str, ranks: int | None, steps: int, allocator: str, memory_format: str
) -> Result:
    env = NEUTRAL if allocator == "neutral" else {}
    args = (steps, memory_format)
    if ranks is None:
        out = run_distributed(_worker, 1, scenario, None, *args, env=env, timeout=3600)
        mode, n = "plain PyTorch", 1
    else:
        grid = SCENARIOS[scenario]["grids"].get(ranks, (1,) * len(SCENARIOS[scenario]["shape"]))
        out = run_distributed(_worker, ranks, scenario, grid, *args, env=env, timeout=3600)
        mode, n = f"haloseg {'x'.join(map(str, grid))}", ranks
    worst = max(out, key=lambda r: r["step_s"])
    comm = {k: max(r["comm_s"].get(k, 0.0) for r in out) for k in worst["comm_s"]}
    cpus = [r["cpu_s"] for r in out]
    return Result(scenario, mode, n, allocator, worst["step_s"], worst["cpu_s"],
                  max(r["peak_mib"] for r in out), comm,
                  max(r["comm_cpu_s"] for r in out), max(r["late_wait_s"] for r in out),
                  max(r["transfer_s"] for r in out), max(cpus) / min(cpus) - 1,
                  memory_format)  # fmt: skip


def run_spatial_benchmark(
    scenarios: list[str], ranks: list[int], steps: int, allocators: list[str],
    memory_formats: list[str] | tuple[str, ...] = MEMORY_FORMATS,
) -> list[Result]:  # fmt: skip
    """Run every configuration, one after another, and return the results."""
    results = []
    for scenario in scenarios:
        for allocator in allocators:
            for fmt in memory_formats:
                for n in [None, *ranks]:
                    log.info("running %s, %s ranks, %s allocator, %s", scenario,
                             n or "plain", allocator, fmt)  # fmt: skip
                    results.append(_config(scenario, n, steps, allocator, fmt))
    return results


def report(results: list[Result]) -> list[dict[str, Any]]:
    """Rows with the ratios the targets are stated in: time and memory against plain / P
    (plain PyTorch in the same memory format), and time against the faster plain PyTorch
    step of the two formats (``time_vs_best_plain``, where both ran)."""
    rows = []
    for r in results:
        plains = [
            p for p in results
            if p.scenario == r.scenario and p.allocator == r.allocator and p.ranks == 1
            and p.mode == "plain PyTorch"
        ]  # fmt: skip
        plain = next(p for p in plains if p.memory_format == r.memory_format)
        best = min(p.step_s for p in plains)
        comm = sum(r.comm_s.values())
        rows.append({
            **asdict(r),
            "time_vs_plain": r.step_s / plain.step_s,
            "time_vs_best_plain": r.step_s / best,
            "memory_vs_plain_over_P": r.peak_mib / (plain.peak_mib / r.ranks),
            "comm_share": comm / r.step_s,
            "comm_cpu_share": r.comm_cpu_s / r.step_s,
            "late_wait_share": r.late_wait_s / r.step_s,
            "transfer_share": r.transfer_s / r.step_s,
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the format of docs/benchmarks.md)."""
    kinds = sorted({k for r in rows for k in r["comm_s"]})
    head = ["mode", "format", "allocator", "step s", "cpu s", "time/plain", "time/best plain",
            "peak MiB",
            "mem/(plain/P)", "comm share", "comm cpu share", "late wait", "transfer",
            "cpu spread",
            *(f"{k} s" for k in kinds)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        plain = r["mode"] == "plain PyTorch"
        cells = [
            r["mode"], r.get("memory_format", "contiguous").replace("_", "-"), r["allocator"],
            f"{r['step_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['time_vs_plain']:.2f}",
            f"{r['time_vs_best_plain']:.2f}", f"{r['peak_mib']:.0f}",
            f"{r['memory_vs_plain_over_P']:.2f}", "—" if plain else f"{r['comm_share']:.1%}",
            "—" if plain else f"{r['comm_cpu_share']:.1%}",
            "—" if plain else f"{r['late_wait_share']:.1%}",
            "—" if plain else f"{r['transfer_share']:.1%}",
            "—" if r["ranks"] == 1 else f"{r['cpu_spread']:.1%}",
            *("—" if plain else f"{r['comm_s'].get(k, 0.0):.3f}" for k in kinds),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "torch": torch.__version__,
        "threads_per_rank": 1,
        "memory_gib": round(
            math.ceil(int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2), 1
        ),
    }


def write_json(rows: list[dict[str, Any]], path: Path, command: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "command": command, "rows": rows}, indent=2))
    tmp.replace(path)
