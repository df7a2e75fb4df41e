"""The inference benchmark's rows compared and printed: speed-ups against MONAI, the
equal-memory pairs, and Markdown tables."""

from __future__ import annotations

from typing import Any

__all__ = ["add_speedups", "equal_memory", "markdown"]


def _is_labels(r: dict[str, Any]) -> bool:
    return r["method"] == "haloseg" and r["output"] == "labels"


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-up against MONAI (overlap 0.25, gaussian) with the window side of haloseg's
    fastest labels configuration's tile core."""
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        best = min(filter(_is_labels, mine), key=lambda r: r["wall_s"], default=None)
        ref = None
        if best is not None:
            same = (
                r
                for r in mine
                if r["method"] == "monai" and r["overlap"] == 0.25 and not r.get("channels_last")
            )
            ref = next((r for r in same if r["roi"] == best["tile"]), None)
        for r in mine:
            r["speedup_vs_monai"] = ref["wall_s"] / r["wall_s"] if ref else None
            r["speedup_reference"] = ref["settings"] if ref else None


def equal_memory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MONAI row at overlap 0.25: haloseg's fastest labels row at no more peak memory."""
    pairs = []
    for m in rows:
        if m["method"] != "monai" or m["overlap"] != 0.25:
            continue
        fits = [r for r in rows if r["scenario"] == m["scenario"] and _is_labels(r)
                and r["peak_mib"] <= m["peak_mib"]]  # fmt: skip
        best = min(fits, key=lambda r: r["wall_s"], default=None)
        pairs.append({
            "scenario": m["scenario"], "monai": m["settings"], "monai_peak_mib": m["peak_mib"],
            "monai_wall_s": m["wall_s"], "haloseg": best["settings"] if best else None,
            "haloseg_peak_mib": best["peak_mib"] if best else None,
            "haloseg_wall_s": best["wall_s"] if best else None,
            "speedup": m["wall_s"] / best["wall_s"] if best else None,
        })  # fmt: skip
    return pairs


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


_HEAD = ["method", "settings", "wall s", "peak MiB", "work", "max abs diff", "max rel diff",
         "labels differing", "speed-up"]  # fmt: skip


def _row(r: dict[str, Any]) -> str:
    diffs = [_fmt(r["max_abs_diff"], ".1e"), _fmt(r["max_rel_diff"], ".1e"),
             f"{r['label_mismatch']:.1e}"]  # fmt: skip
    if r["method"] == "whole":
        diffs = ["reference"] * 3
    cells = [r["method"], r["settings"], f"{r['wall_s']:.1f}", f"{r['peak_mib']:.0f}",
             f"{r['work']:.2f}", *diffs, _fmt(r["speedup_vs_monai"], ".2f")]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _pair(p: dict[str, Any]) -> str:
    cells = [p["scenario"], p["monai"], f"{p['monai_peak_mib']:.0f}", f"{p['monai_wall_s']:.1f}",
             p["haloseg"] or "none fits", _fmt(p["haloseg_peak_mib"], ".0f"),
             _fmt(p["haloseg_wall_s"], ".1f"), _fmt(p["speedup"], ".2f")]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown: one table per scenario, then the equal-memory pairs."""
    parts = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        first = mine[0]
        title = (f"**{name}**, {first['threads']} thread(s), {first['allocator']} allocator; "
                 f"speed-up against MONAI {first['speedup_reference'] or '(not run)'}")  # fmt: skip
        table = ["| " + " | ".join(_HEAD) + " |", "|---|---|" + "---:|" * (len(_HEAD) - 2)]
        parts.append("\n".join([title, "", *table, *map(_row, mine)]))
    pairs = equal_memory(rows)
    if pairs:
        title = "**At equal or lower peak memory**: haloseg labels against MONAI, overlap 0.25"
        table = ["| scenario | MONAI | MiB | s | haloseg | MiB | s | speed-up |",
                 "|---|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
        parts.append("\n".join([title, "", *table, *map(_pair, pairs)]))
    return "\n\n".join(parts) + "\n"
