"""Training throughput benchmark: the demo task at 1, 2 and 4 ranks (1x1, 1x2, 2x2 grids).

Each configuration trains the demo's U-Net on the demo's images in fresh processes of one
thread each; the table gives images per second (batch over the slowest rank's median step
time) and each rank's peak memory during a step (rise of the resident set, and the whole
process's peak).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from typing import Any

from haloseg.bench.spatial import NEUTRAL
from haloseg.config import RunConfig, demo_config, timing_config
from haloseg.parallel.spawn import run_distributed
from haloseg.training import build_trainer, final_metrics, fit

__all__ = ["GRIDS", "markdown", "run_training_benchmark"]

log = logging.getLogger(__name__)

GRIDS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}


def _worker(cfg: RunConfig) -> dict[str, Any]:
    trainer = build_trainer(cfg)
    fit(trainer, progress=False)
    metrics = final_metrics(trainer)
    # Leave out the first steps: plans, allocator and caches warm up there.
    metrics["step_seconds"] = trainer.step_seconds[2:] or trainer.step_seconds
    return metrics


def _one(ranks: int, steps: int, size: int, allocator: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="haloseg-bench-") as tmp:
        cfg = timing_config(demo_config(tmp, steps=steps, size=size), list(GRIDS[ranks]))
        env = NEUTRAL if allocator == "neutral" else {}
        out = run_distributed(_worker, ranks, cfg, env=env, timeout=3600, threads=1)
    # A step ends for everyone at the last collective: the slowest rank's median sets the pace.
    step_s = max(statistics.median(m["step_seconds"]) for m in out)
    batch = cfg.train.batch_size * cfg.train.accumulate
    return {
        "ranks": ranks,
        "grid": "x".join(map(str, GRIDS[ranks])),
        "allocator": allocator,
        "size": size,
        "batch": batch,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "step_peak_mib": [round(m["peak_step_mib"], 1) for m in out],
        "process_peak_mib": [round(m["peak_rss_mib"], 1) for m in out],
    }


def run_training_benchmark(
    ranks: list[int], steps: int, size: int, allocators: list[str]
) -> list[dict[str, Any]]:
    """One row per (allocator, ranks), with speed-up and memory against 1 rank."""
    rows = []
    for allocator in allocators:
        for n in ranks:
            log.info("training %d step(s) on %d rank(s), %s allocator", steps, n, allocator)
            rows.append(_one(n, steps, size, allocator))
    for row in rows:
        base = next((r for r in rows if r["allocator"] == row["allocator"] and r["ranks"] == 1),
                    None)  # fmt: skip
        row["speedup"] = base["step_s"] / row["step_s"] if base else float("nan")
        row["memory_vs_1_rank"] = (
            max(row["step_peak_mib"]) / base["step_peak_mib"][0] if base else float("nan")
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the format of docs/benchmarks.md)."""
    lines = [
        "| ranks | grid | allocator | step s | images/s | speed-up | step peak MiB per rank "
        "| max / 1 rank | process peak MiB per rank |",
        "|---:|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['grid']} | {r['allocator']} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.2f} | {r['speedup']:.2f} | "
            f"{', '.join(f'{m:.0f}' for m in r['step_peak_mib'])} | "
            f"{r['memory_vs_1_rank']:.2f} | "
            f"{', '.join(f'{m:.0f}' for m in r['process_peak_mib'])} |"
        )
    return "\n".join(lines)
