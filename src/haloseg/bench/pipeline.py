"""Pipeline benchmark: speed-up of 2 and 4 stages against one stage, and the balancer.

Each configuration runs in fresh processes with one thread each: one stage is the
unmodified U-Net in one process accumulating gradients over the same micro-batches (the
step the pipeline is exact against); ``S`` stages are ``S`` processes running the GPipe or
1F1B schedule. One stage with as many threads as the pipeline has processes is the
equal-cores baseline. Per stage, the CPU time of its process during a step measures its
work (waiting for a message takes no CPU), so the slowest stage's CPU time over the mean
is the balance as run, whatever the machine's core count. Step times are medians.

The balancer's prediction: block costs measured here (``measure_blocks``), the balanced
partition against an even split of the blocks, for the ``large`` preset.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from haloseg.models import unet_preset
from haloseg.parallel import Decomposition
from haloseg.parallel.spawn import run_distributed
from haloseg.pipeline import unet_blocks
from haloseg.pipeline.balance import even_split, measure_blocks, partition, plan_stages
from haloseg.pipeline.loss import pack_target, segmentation_loss
from haloseg.resident import reset_peak, resident_kib

__all__ = ["SCENARIOS", "balance_rows", "markdown", "run_pipeline_benchmark"]

SCENARIOS: dict[str, dict[str, Any]] = {
    "2d-256": {"preset": "small", "shape": (256, 256), "in_channels": 4},
    "2d-512": {"preset": "small", "shape": (512, 512), "in_channels": 4},
    "large-2d-128": {"preset": "large", "shape": (128, 128), "in_channels": 4},
}
CLASSES = 3


@dataclass(frozen=True)
class Run:
    scenario: str
    stages: int
    microbatches: int
    schedule: str
    balance: str
    threads: int = 1


def _model(scenario: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    s = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = unet_preset(s["preset"], spatial_dims=len(s["shape"]),
                        in_channels=s["in_channels"], out_channels=CLASSES)  # fmt: skip
    return model, torch.randn(1, s["in_channels"], *s["shape"]), \
        torch.randint(0, CLASSES, (1, *s["shape"])), model.downsampling_factor  # fmt: skip


def _timed(step: Any, steps: int) -> dict[str, float]:
    times, cpus, peaks = [], [], []
    for k in range(steps + 1):
        if dist.is_initialized():
            dist.barrier()
        reset_peak()
        base = resident_kib("VmRSS") or 0
        start, cpu = time.perf_counter(), time.process_time()
        step()
        if dist.is_initialized():
            dist.barrier()
        if k:  # the first step builds schedules and warms caches
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            peaks.append(((resident_kib("VmHWM") or 0) - base) / 1024)
    return {"step_s": statistics.median(times), "cpu_s": statistics.median(cpus),
            "peak_mib": max(peaks)}  # fmt: skip


def _one_stage(run: Run, steps: int) -> dict[str, Any]:
    model, x1, t1, _ = _model(run.scenario)
    m = run.microbatches
    x, target = x1.expand(m, *x1.shape[1:]).clone(), t1.expand(m, *t1.shape[1:]).clone()

    loss = segmentation_loss(Decomposition((1,) * (x.dim() - 2)))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        for k in range(m):
            loss(model(x[k : k + 1]), target[k : k + 1]).div(m).backward()

    return {"stage": 0, "balance": [len(unet_blocks(model))], **_timed(step, steps)}


def _stage_worker(run: Run, steps: int) -> dict[str, Any]:
    from haloseg.pipeline.mesh import pipeline_layout
    from haloseg.pipeline.runner import Pipeline

    if run.stages == 1:
        return _one_stage(run, steps)
    model, x1, t1, _ = _model(run.scenario)
    m = run.microbatches
    x, target = x1.expand(m, *x1.shape[1:]).clone(), t1.expand(m, *t1.shape[1:]).clone()
    layout = pipeline_layout(run.stages)
    n = len(unet_blocks(model))
    balance = None if run.balance == "auto" else even_split(n, run.stages)
    pipe = Pipeline(model, layout, microbatches=m, schedule=run.schedule, balance=balance,
                    example=x[:1])  # fmt: skip
    packed = pack_target(target)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        pipe.step(x, packed if layout.is_last else None)

    return {"stage": layout.stage, "balance": list(pipe.balance), **_timed(step, steps)}


def _measure(run: Run, steps: int) -> list[dict[str, Any]]:
    world = run.stages
    return run_distributed(_stage_worker, world, run, steps, threads=run.threads, timeout=1800)


def run_pipeline_benchmark(
    scenario: str, stage_counts: list[int], microbatches: list[int], schedules: list[str],
    steps: int, balances: list[str], repeats: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows per configuration: step time against one stage (one thread) and against one
    stage on as many threads as the pipeline has processes, CPU time per stage. With
    ``repeats``, every configuration runs that many times, interleaved with the others (the
    machine's drift hits all alike), and each figure is the median over the runs."""
    runs = []
    for m in microbatches:
        runs.append(Run(scenario, 1, m, "-", "-"))
        runs += [Run(scenario, 1, m, "-", "-", threads=s) for s in stage_counts if s > 1]
        runs += [Run(scenario, s, m, schedule, balance) for s in stage_counts if s > 1
                 for schedule in schedules for balance in balances]  # fmt: skip
    measured: dict[Run, list[list[dict[str, Any]]]] = {r: [] for r in runs}
    for _ in range(repeats):
        for run in runs:
            measured[run].append(_measure(run, steps))
    merged = {r: _median_ranks(v) for r, v in measured.items()}
    rows = []
    for run in runs:
        if run.stages == 1 and run.threads > 1:
            continue
        base = merged[Run(scenario, 1, run.microbatches, "-", "-")][0]
        wide = merged.get(Run(scenario, 1, run.microbatches, "-", "-", threads=run.stages))
        rows.append(_row(run, merged[run], base, (wide or [base])[0], repeats))
    return rows


def _median_ranks(repeats: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rank, the median of each figure over the repeated runs."""
    out = []
    for ranks in zip(*repeats, strict=True):
        merged = dict(ranks[0])
        for key in ("step_s", "cpu_s", "peak_mib"):
            merged[key] = statistics.median(r[key] for r in ranks)
        out.append(merged)
    return out


def _row(
    run: Run, ranks: list[dict[str, Any]], base: dict, wide: dict, repeats: int
) -> dict[str, Any]:
    step = max(r["step_s"] for r in ranks)
    cpus = [r["cpu_s"] for r in sorted(ranks, key=lambda r: r["stage"])]
    return {
        "scenario": run.scenario, "stages": run.stages, "microbatches": run.microbatches,
        "schedule": run.schedule, "balance_mode": run.balance, "blocks": ranks[0]["balance"],
        "step_s": step, "speedup": base["step_s"] / step,
        "speedup_equal_cores": wide["step_s"] / step,
        "stage_cpu_s": cpus, "cpu_slowest_over_mean": max(cpus) / statistics.fmean(cpus),
        "peak_mib": [r["peak_mib"] for r in sorted(ranks, key=lambda r: r["stage"])],
        "repeats": repeats,
    }  # fmt: skip


def balance_rows(
    preset: str, shape: tuple[int, ...], stage_counts: list[int], microbatches: int
) -> list[dict[str, Any]]:
    """The balancer against an even split on ``preset``: block costs measured here."""
    torch.manual_seed(0)
    model = unet_preset(preset, spatial_dims=len(shape), in_channels=4, out_channels=CLASSES)
    seq = unet_blocks(model)
    costs = measure_blocks(seq, torch.empty(1, 4, *shape), align=model.downsampling_factor)
    rows = []
    for s in stage_counts:
        kw = {"microbatches": microbatches, "schedule": "1f1b"}
        bal = plan_stages(costs, partition(costs, s, **kw), **kw)
        even = plan_stages(costs, even_split(len(costs), s), **kw)
        rows.append({
            "preset": preset, "shape": list(shape), "blocks_total": len(costs), "stages": s,
            "balanced": list(bal.sizes), "balanced_slowest_over_mean": bal.slowest_over_mean,
            "even": list(even.sizes), "even_slowest_over_mean": even.slowest_over_mean,
            "balanced_speedup": bal.speedup, "even_speedup": even.speedup,
            "stage_memory_mib": [b / 2**20 for b in bal.memory],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], balance: list[dict[str, Any]]) -> str:
    lines = ["| stages | micro-batches | schedule | balance | blocks | step s | ÷ one stage "
             "| ÷ one stage, equal cores | stage CPU slowest/mean |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['stages']} | {r['microbatches']} | {r['schedule']} | {r['balance_mode']} | "
            f"{r['blocks']} | {r['step_s']:.3f} | {r['speedup']:.2f} | "
            f"{r['speedup_equal_cores']:.2f} | {r['cpu_slowest_over_mean']:.3f} |"
        )
    if balance:
        lines += ["", "| preset | stages | balanced | slowest/mean | even split | slowest/mean |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for b in balance:
            lines.append(
                f"| {b['preset']} | {b['stages']} | {b['balanced']} | "
                f"{b['balanced_slowest_over_mean']:.3f} | {b['even']} | "
                f"{b['even_slowest_over_mean']:.3f} |"
            )
    return "\n".join(lines)
