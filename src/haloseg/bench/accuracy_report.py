"""The accuracy study's records summarised: Dice per arm with its spread over seeds, whole
image against the best patch arm per task, a Markdown table, a figure and the JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.bench.accuracy import CLASSES, AccuracyConfig, arms, config_dict
from haloseg.plots import pyplot, save_figure

__all__ = ["compare", "markdown", "plot", "summarise", "write_json"]

SCORES = (*(f"class{c}" for c in CLASSES), "mean")
"""Dice of each object class, and their mean."""


def _stats(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()),
            "seeds": [float(x) for x in v]}  # fmt: skip


def _scores(record: dict[str, Any]) -> dict[str, float]:
    dice = record["dice"]
    return {**{f"class{c}": d for c, d in zip(CLASSES, dice)}, "mean": float(np.mean(dice))}


def summarise(records: list[dict[str, Any]], cfg: AccuracyConfig) -> list[dict[str, Any]]:
    """One row per (task, arm): its budget, and each Dice as mean, std (over seeds, ddof 1),
    min, max and the per-seed values."""
    d, rows = cfg.spatial_dims, []
    for task in dict.fromkeys(r["task"] for r in records):
        for arm in arms(cfg):
            mine = sorted((r for r in records if r["task"] == task and r["arm"] == arm.name),
                          key=lambda r: r["seed"])  # fmt: skip
            if not mine:
                continue
            scores = [_scores(r) for r in mine]
            rows.append({
                "task": task, "arm": arm.name, "kind": arm.kind,
                "side": arm.stages[-1].side if arm.kind == "patch" else cfg.size,
                "stages": [{"side": s.side, "batch": s.batch, "steps": s.steps}
                           for s in arm.stages],
                "steps": cfg.steps, "voxels_per_step": cfg.size**d,
                "voxels_seen": arm.voxels_seen(d),
                "inference": "sliding window" if arm.kind == "patch" else "whole image",
                "dice": {k: _stats([s[k] for s in scores]) for k in SCORES},
                "train_s": float(np.mean([r["train_s"] for r in mine])),
                "final_loss": float(np.mean([r["final_loss"] for r in mine])),
            })  # fmt: skip
    return rows


def _difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a - b`` per score, seed by seed (paired: same data and initial weights); its mean
    is the difference of the means."""
    out = {}
    for k in SCORES:
        paired = np.subtract(a["dice"][k]["seeds"], b["dice"][k]["seeds"])
        out[k] = _stats(list(paired))
    return out


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: the best patch arm (highest mean Dice over the classes) and the whole-image
    and progressive arms minus it, with the spread of the per-seed differences."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = {r["arm"]: r for r in rows if r["task"] == task}
        patches = [r for r in mine.values() if r["kind"] == "patch"]
        if not patches:
            continue
        best = max(patches, key=lambda r: r["dice"]["mean"]["mean"])
        item: dict[str, Any] = {"task": task, "best_patch": best["arm"]}
        for name in ("whole", "progressive"):
            if name in mine:
                item[f"{name}_minus_best_patch"] = _difference(mine[name], best)
        out.append(item)
    return out


def _cell(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def markdown(rows: list[dict[str, Any]], comparison: list[dict[str, Any]]) -> str:
    """Both tables in Markdown (the format of docs/accuracy.md)."""
    head = ["task", "arm", "patch side(s) × batch", "inference",
            *(f"Dice {k}" for k in SCORES), "train s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "---:|" * (len(SCORES) + 1)]
    for r in rows:
        stages = " → ".join(f"{s['side']} × {s['batch']}" for s in r["stages"])
        cells = [r["task"], r["arm"], stages, r["inference"],
                 *(_cell(r["dice"][k]) for k in SCORES), f"{r['train_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| task | best patch arm | " + " | ".join(
        f"{a} − best patch, {k}" for a in ("whole", "progressive") for k in SCORES) + " |",
        "|---|---|" + "---:|" * (2 * len(SCORES))]  # fmt: skip
    for c in comparison:
        cells = [c["task"], c["best_patch"]]
        for a in ("whole", "progressive"):
            diff = c.get(f"{a}_minus_best_patch")
            cells += [_signed(diff[k]) if diff else "—" for k in SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:+.3f} ± {stats['std']:.3f}"


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, size: int) -> None:
    """Dice against patch side, one panel per task: a line per class through the patch arms
    and the whole image (side ``size``), progressive growth apart to the right; error bars
    are the standard deviation over seeds."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False,
                             sharey=True)  # fmt: skip
    right = size * 2**0.6
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        line = sorted((r for r in mine if r["kind"] != "progressive"), key=lambda r: r["side"])
        grown = [r for r in mine if r["kind"] == "progressive"]
        for k, colour in zip(SCORES, ("tab:blue", "tab:orange", "black")):
            name = "mean of the classes" if k == "mean" else k.replace("class", "class ")
            style = {"color": colour, "capsize": 3}
            ax.errorbar([r["side"] for r in line], [r["dice"][k]["mean"] for r in line],
                        yerr=[r["dice"][k]["std"] for r in line], marker="o",
                        linestyle="-" if k != "mean" else ":", label=name, **style)  # fmt: skip
            for r in grown:
                ax.errorbar([right], [r["dice"][k]["mean"]], yerr=[r["dice"][k]["std"]],
                            marker="D", mfc="white", **style)  # fmt: skip
        sides = [r["side"] for r in line]
        ax.set_xscale("log", base=2)
        ax.set_xticks([*sides, *([right] if grown else [])])
        ax.set_xticklabels([*(f"{s}" + ("\nwhole" if s == size else "") for s in sides),
                            *(["progr."] if grown else [])])  # fmt: skip
        ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("patch side (voxels)")
        ax.grid(alpha=0.3)
    seeds = len(rows[0]["dice"]["mean"]["seeds"])
    fig.suptitle(f"Equal budgets of voxels; error bars: standard deviation over {seeds} seed(s)",
                 fontsize=10)  # fmt: skip
    axes[0][0].set_ylabel("Dice on held-out images")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


def write_json(
    path: str | os.PathLike,
    cfg: AccuracyConfig,
    rows: list[dict[str, Any]],
    comparison: list[dict[str, Any]],
    records: list[dict[str, Any]],
    command: str,
) -> None:
    """Everything, written to a hidden file beside ``path`` and renamed over it."""
    from haloseg.bench.spatial import machine

    path = Path(path)
    # Threads differ by arm (config.threads in one process, 1 per rank of the grid).
    host = {k: v for k, v in machine().items() if k != "threads_per_rank"}
    payload = {"machine": host, "command": command, "config": config_dict(cfg),
               "rows": rows, "comparison": comparison, "runs": records}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
