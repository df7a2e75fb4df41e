"""``haloseg demo``: train a U-Net on synthetic ellipses split over a 2x2 grid of processes.

No arguments, no downloads. The run folder gets ``metrics.json``, ``overlays.png``,
``curve.png``, TensorBoard logs, checkpoints, and ``comparison.md``: per-rank peak memory
and step time of the 2x2 run beside the same training step in one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from haloseg.config import GRID as GRID
from haloseg.config import RunConfig, demo_config, timing_config
from haloseg.parallel.spawn import run_distributed
from haloseg.training import train

__all__ = ["GRID", "run_demo"]

SINGLE_STEPS = 12


def _train(cfg: RunConfig, progress: bool) -> dict[str, Any]:
    return train(cfg, progress=progress)


def _single(cfg: RunConfig) -> dict[str, Any]:
    return train(cfg, progress=False, previews=0)


def _comparison(ranks: list[dict[str, Any]], single: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"run": "one process (whole image)", "rank": 0, **_cost(single)}]
    for r, m in enumerate(ranks):
        rows.append({"run": f"haloseg {GRID[0]}x{GRID[1]}", "rank": r, **_cost(m)})
    for row in rows:
        row["time_vs_single"] = row["step_s"] / rows[0]["step_s"]
        row["memory_vs_single"] = row["step_peak_mib"] / rows[0]["step_peak_mib"]
    return rows


def _cost(m: dict[str, Any]) -> dict[str, float]:
    return {"step_s": m["step_seconds_median"], "step_peak_mib": m["peak_step_mib"],
            "process_peak_mib": m["peak_rss_mib"]}  # fmt: skip


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | rank | step s (median) | x one process | step peak MiB | x one process "
        "| process peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['rank']} | {r['step_s']:.3f} | {r['time_vs_single']:.2f} | "
            f"{r['step_peak_mib']:.1f} | {r['memory_vs_single']:.2f} | "
            f"{r['process_peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_demo(
    folder: str | None = None, *, steps: int = 200, size: int = 256, progress: bool = True
) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """Train the demo on 4 local processes, then time the same step in one process.

    Returns the run folder, the run's metrics and the comparison rows.
    """
    folder = folder or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    cfg = demo_config(folder, steps=steps, size=size)
    world = math.prod(GRID)
    ranks = run_distributed(_train, world, cfg, progress, timeout=1800, threads=1)
    with tempfile.TemporaryDirectory(prefix="haloseg-single-") as tmp:
        single_cfg = dataclasses.replace(
            timing_config(cfg, [1, 1], steps=SINGLE_STEPS), output_dir=tmp
        )
        (single,) = run_distributed(_single, 1, single_cfg, timeout=900, threads=1)
    rows = _comparison(ranks, single)
    path = Path(folder)
    metrics = json.loads((path / "metrics.json").read_text())
    metrics["comparison"] = rows
    _write(path / "metrics.json", json.dumps(metrics, indent=2))
    _write(path / "comparison.md", comparison_markdown(rows))
    return path, metrics, rows


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
