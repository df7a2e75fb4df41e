"""The results of a search: one row per trial (its values and last metrics), best first;
written as ``results.csv`` and plotted, metric against step per trial, as ``results.png``."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haloseg.config import RunConfig
from haloseg.plots import pyplot, save_figure
from haloseg.tune.space import SearchSpec

__all__ = ["METRICS", "Results", "collect_results", "plot_results", "write_csv"]

METRICS = ("dice_mean", "val_loss", "loss", "step", "step_seconds_median", "time_total_s")
"""The metrics of each trial in the table, after the searched one."""


@dataclass
class Results:
    """A search's trials, best first."""

    metric: str
    mode: str
    keys: list[str]
    """The searched config keys (columns of values)."""
    rows: list[dict[str, Any]]
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """Per trial: the steps of its reports and the metric there."""
    path: str = ""
    """The experiment on storage."""

    @property
    def columns(self) -> list[str]:
        extra = [m for m in METRICS if m != self.metric]
        return ["trial", "status", *self.keys, self.metric, *extra]

    @property
    def best(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows and self.rows[0]["status"] != "error" else None

    def write(self, folder: Path) -> None:
        write_csv(self, folder / "results.csv")
        plot_results(self, folder / "results.png")


def _status(result: Any, steps: int) -> str:
    """done (all of the trial's own steps), stopped early (ASHA), or error."""
    if result.error is not None:
        return "error"
    steps = (result.config or {}).get("train.steps", steps)
    return "done" if (result.metrics or {}).get("step", 0) >= steps else "stopped"


def _sort_key(row: dict[str, Any], metric: str, mode: str) -> tuple[int, float]:
    value = row.get(metric)
    if row["status"] == "error" or not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def collect_results(grid: Any, search: SearchSpec, base: RunConfig) -> Results:
    """``Results`` from Tune's ``ResultGrid``."""
    keys = [p.key for p in search.params]
    rows, curves = [], {}
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial-")
        row = {"trial": trial, "status": _status(result, base.train.steps)}
        row.update({k: config.get(k) for k in keys})
        row.update({m: metrics.get(m) for m in (search.metric, *METRICS)})
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and "step" in frame and search.metric in frame:
            frame = frame.dropna(subset=[search.metric])
            curves[trial] = (frame["step"].tolist(), frame[search.metric].tolist())
    rows.sort(key=lambda r: _sort_key(r, search.metric, search.mode))
    return Results(search.metric, search.mode, keys, rows, curves, grid.experiment_path)


def write_csv(results: Results, path: Path) -> None:
    """The table as CSV, best trial first."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results.rows)
    tmp.replace(path)


def _label(row: dict[str, Any], keys: list[str]) -> str:
    values = ", ".join(f"{k.split('.')[-1]}={_short(row[k])}" for k in keys)
    return f"{row['trial']}: {values}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_results(results: Results, path: Path) -> None:
    """The searched metric against step, one line per trial; the best one thick."""
    fig, ax = pyplot().subplots(figsize=(8, 5))
    best = results.best
    for row in results.rows:
        if row["trial"] not in results.curves:
            continue
        steps, values = results.curves[row["trial"]]
        top = best is not None and row["trial"] == best["trial"]
        ax.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if top else 1,
                label=_label(row, results.keys) + (" (best)" if top else ""))  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(results.metric)
    ax.set_title(f"{len(results.rows)} trials, {results.mode} {results.metric}")
    ax.grid(alpha=0.3)
    if results.curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
