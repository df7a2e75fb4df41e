"""Experiment against data parallelism: one fixed search (8 configurations of the ellipse
task, equal work each) run on Ray Tune three ways on ``workers`` CPUs of one thread each:

- ``sequential``: one trial at a time, one process each (the baseline);
- ``parallel``: ``workers`` trials at once, one process each (experiment parallelism);
- ``data-parallel``: one trial at a time, each a Ray Train run of ``workers`` data-parallel
  processes (the same global batch, split over the replicas).

Every trial trains the same number of steps (no early stopping) and validates at its end.
The speed-up is the sequential search's wall time over each mode's.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from haloseg.config import DataConfig, ParallelConfig, RunConfig, TrainConfig

__all__ = ["MODES", "SEARCH", "markdown", "run_tune_benchmark"]

log = logging.getLogger(__name__)

MODES = ("sequential", "parallel", "data-parallel")
SEARCH: dict[str, Any] = {
    "metric": "dice_mean",
    "scheduler": "fifo",
    "max_failures": 0,
    "space": {
        "train.lr": {"grid": [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3]},
        "train.weight_decay": {"grid": [0.0, 1.0e-4]},
    },
}
"""The fixed search: 4 learning rates x 2 weight decays."""
BATCH = 2


def _base(folder: Path, steps: int, size: int, data: int) -> RunConfig:
    return RunConfig(
        name="bench-tune", output_dir=str(folder), device="cpu",
        data=DataConfig(shape=[size, size], num_images=24, num_classes=3),
        parallel=ParallelConfig(data=data),
        train=TrainConfig(steps=steps, batch_size=BATCH // data, val_every=steps,
                          checkpoint_every=steps, warmup_steps=min(10, steps // 4)),
    )  # fmt: skip


def _one(mode: str, workers: int, steps: int, size: int, folder: Path) -> dict[str, Any]:
    from haloseg.tune import parse_search, run_search

    data = workers if mode == "data-parallel" else 1
    base = _base(folder / mode, steps, size, data)
    concurrent = workers if mode == "parallel" else 1
    search = parse_search({**SEARCH, "max_concurrent": concurrent}, base)
    start = time.perf_counter()
    results = run_search(base, search, progress=False)
    wall = time.perf_counter() - start
    errors = [r for r in results.rows if r["status"] != "done"]
    if errors:
        raise RuntimeError(f"{mode}: {len(errors)} trial(s) did not finish: {errors[0]}")
    trial_s = [r["time_total_s"] for r in results.rows]
    best = results.best
    return {
        "mode": mode, "workers": workers, "concurrent": concurrent, "processes": data,
        "trials": len(results.rows), "steps": steps, "size": size, "batch": BATCH,
        "wall_s": wall, "trial_s_median": statistics.median(trial_s),
        "trial_s": [round(t, 2) for t in trial_s],
        "step_s_median": statistics.median(r["step_seconds_median"] for r in results.rows),
        "best_dice_mean": best["dice_mean"] if best else None,
    }  # fmt: skip


def run_tune_benchmark(
    workers: int, steps: int, size: int, modes: list[str] | tuple[str, ...] = MODES
) -> list[dict[str, Any]]:
    """One row per mode, with its speed-up over the sequential search (when measured)."""
    from haloseg.tune import ray_cluster

    rows = []
    with tempfile.TemporaryDirectory(prefix="haloseg-bench-tune-") as tmp:
        with ray_cluster(cpus=workers):
            for mode in modes:
                log.info("search: %s", mode)
                rows.append(_one(mode, workers, steps, size, Path(tmp)))
    base = next((r for r in rows if r["mode"] == "sequential"), None)
    for row in rows:
        row["speedup"] = base["wall_s"] / row["wall_s"] if base else float("nan")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the format of docs/benchmarks.md)."""
    lines = [
        "| mode | concurrent trials | processes per trial | wall s | trial s (median) "
        "| step s (median) | speed-up | best dice_mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = "—" if r["best_dice_mean"] is None else f"{r['best_dice_mean']:.3f}"
        lines.append(
            f"| {r['mode']} | {r['concurrent']} | {r['processes']} | {r['wall_s']:.1f} | "
            f"{r['trial_s_median']:.1f} | {r['step_s_median']:.3f} | {r['speedup']:.2f} | "
            f"{best} |"
        )
    return "\n".join(lines)
