"""Inference benchmark: exact tiled inference against whole-image inference and MONAI.

One image per scenario (synthetic ellipses, 8192² in 2-D, 256³ in 3-D) and a U-Net trained
briefly on the same task. Each configuration runs in a fresh process (one thread unless
asked): whole-image inference (the reference, its logits kept on disk), haloseg's
``predict_tiled`` (labels, float16 probabilities, float32 logits) at some tile sizes, and
MONAI's ``sliding_window_inference`` (gaussian blending) at some window sizes and overlaps,
followed by an arg-max. Per configuration: wall time, the rise of the resident set above the
process with the model and the image loaded (peak reset through ``/proc/self/clear_refs``),
the voxels that go through the network per image voxel, and the difference from the
reference: largest absolute difference of the scores and the share of differing labels.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from haloseg.bench.spatial import NEUTRAL
from haloseg.data import EllipseDataset
from haloseg.errors import ConfigError
from haloseg.inference import plan_tiles, predict_tiled, predict_whole, receptive_field
from haloseg.inference.tiles import aligned_tile, count_voxels
from haloseg.models import unet_preset
from haloseg.parallel.spawn import run_distributed
from haloseg.resident import reset_peak, resident_kib

__all__ = ["SCENARIOS", "Scenario", "equal_memory", "markdown", "run_inference_benchmark"]

log = logging.getLogger(__name__)

CLASSES = 3


@dataclass(frozen=True)
class Scenario:
    """One test image, the network fitted for it, and the configurations to compare."""

    shape: tuple[int, ...]
    """Spatial shape of the test image (sample 0 of ``EllipseDataset(shape)``)."""
    train_shape: tuple[int, ...]
    """Spatial shape of the training images."""
    train_steps: int
    """AdamW steps on the training images (batch 2 in 2-D, 1 in 3-D)."""
    haloseg: tuple[tuple[str, int], ...]
    """``predict_tiled`` runs: (output, side of the tile core)."""
    monai: tuple[tuple[int, float], ...]
    """``sliding_window_inference`` runs: (side of the window, overlap); gaussian blending."""
    monai_channels_last: tuple[tuple[int, float], ...] = ()
    """The same, with the model converted to channels-last memory format first (the layout
    ``predict_tiled`` runs on CPU), so the comparison does not rest on the layout alone."""


SCENARIOS: dict[str, Scenario] = {
    "2d-8192": Scenario(
        shape=(8192, 8192),
        train_shape=(256, 256),
        train_steps=30,
        haloseg=(("labels", 1024), ("labels", 2048), ("probabilities", 2048), ("logits", 2048)),
        monai=((512, 0.25), (1024, 0.25), (2048, 0.25), (512, 0.5), (1024, 0.5)),
        monai_channels_last=((512, 0.25),),
    ),
    # The 2-D targets alone: haloseg's fastest tile against MONAI's cheapest setting.
    "2d-8192-target": Scenario(
        shape=(8192, 8192),
        train_shape=(256, 256),
        train_steps=30,
        haloseg=(("labels", 1024),),
        monai=((512, 0.25), (1024, 0.25)),
        monai_channels_last=((512, 0.25),),
    ),
    # The halo is 112 per side: at 256³ a tile core of 64 puts 27 times the image through the
    # network, 128 puts 5.4 times; no core below the whole image does better.
    "3d-256": Scenario(
        shape=(256, 256, 256),
        train_shape=(64, 64, 64),
        train_steps=20,
        haloseg=(("labels", 128), ("probabilities", 128)),
        monai=((96, 0.25), (128, 0.25), (96, 0.5), (128, 0.5)),
    ),
    # A smoke run of every code path in about a minute.
    "2d-1024": Scenario(
        shape=(1024, 1024),
        train_shape=(128, 128),
        train_steps=5,
        haloseg=(("labels", 256), ("probabilities", 256), ("logits", 256)),
        monai=((256, 0.25), (256, 0.5)),
    ),
}


def _model(spatial_dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return unet_preset("small", spatial_dims=spatial_dims, in_channels=1, out_channels=CLASSES)


def _slabs(shape: tuple[int, ...], voxels: int = 2**22) -> Iterator[tuple[int, int]]:
    """Ranges of the first spatial dim holding about ``voxels`` voxels each."""
    step = max(1, voxels // math.prod(shape[1:]))
    for lo in range(0, shape[0], step):
        yield lo, min(lo + step, shape[0])


def _prepare(name: str, folder: str) -> dict[str, Any]:
    """Fit the network, write its weights and the test image under ``folder``."""
    sc = SCENARIOS[name]
    data = EllipseDataset(sc.train_shape, num_images=8, num_classes=CLASSES)
    full = tuple((0, n) for n in sc.train_shape)
    pairs = [data.read(i, full) for i in range(len(data))]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
    model = _model(len(sc.shape)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = 2 if len(sc.shape) == 2 else 1
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(sc.train_steps):
        pick = torch.randperm(len(data), generator=gen)[:batch]
        loss = F.cross_entropy(model(images[pick]), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.save(model.state_dict(), Path(folder, "model.pt"))
    # Written slab by slab: the generator's temporaries are several times the slab.
    test = EllipseDataset(sc.shape, num_images=1, num_classes=CLASSES)
    image = np.lib.format.open_memmap(
        Path(folder, "image.npy"), mode="w+", dtype=np.float32, shape=(1, *sc.shape)
    )
    for lo, hi in _slabs(sc.shape):
        box = ((lo, hi), *((0, n) for n in sc.shape[1:]))
        image[:, lo:hi] = test.read(0, box)[0]
    image.flush()
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1]}


def _run(spec: dict[str, Any], model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The configuration's result: scores ``(C, *spatial)`` or labels ``(*spatial)``."""
    spatial_dims = image.ndim - 1
    if spec["method"] == "whole":
        alignment = receptive_field(model, spatial_dims).alignment
        return predict_whole(model, torch.from_numpy(image)[None], alignment)[0].numpy()
    if spec["method"] == "haloseg":
        tile = (spec["tile"],) * spatial_dims
        return predict_tiled(model, image, tile, output=spec["output"])
    from monai.inferers import sliding_window_inference

    if spec.get("channels_last"):
        fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(image)[None],
            (spec["roi"],) * spatial_dims,
            1,
            model,
            overlap=spec["overlap"],
            mode="gaussian",
        )[0]
    # The arg-max is part of the timed pipeline (its labels are those _compare derives).
    # Slab by slab into uint8: a plain argmax would add an int64 map to MONAI's peak.
    labels = np.empty(image.shape[1:], np.uint8)
    for lo, hi in _slabs(labels.shape):
        labels[lo:hi] = logits[:, lo:hi].argmax(0).numpy()
    return logits.numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _compare(result: np.ndarray, output: str, reference: Path) -> dict[str, float | None]:
    """Largest score difference (relative to the largest reference score) and the share of
    labels that differ from the reference arg-max, slab by slab."""
    ref = np.load(reference, mmap_mode="r")
    shape = ref.shape[1:]
    diff, scale, wrong = 0.0, 0.0, 0
    for lo, hi in _slabs(shape):
        want = np.asarray(ref[:, lo:hi], np.float32)
        truth = want.argmax(0)
        if output == "labels":
            wrong += int((result[lo:hi] != truth).sum())
            continue
        got = np.asarray(result[:, lo:hi], np.float32)
        if output == "probabilities":
            want = _softmax(want)
        diff = max(diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        wrong += int((got.argmax(0) != truth).sum())
    scored = output != "labels"
    return {
        "max_abs_diff": diff if scored else None,
        "max_rel_diff": diff / scale if scored and scale else None,
        "label_mismatch": wrong / math.prod(shape),
    }


def _worker(spec: dict[str, Any], folder: str) -> dict[str, Any]:
    image = np.load(Path(folder, "image.npy"))
    model = _model(image.ndim - 1)
    model.load_state_dict(torch.load(Path(folder, "model.pt"), weights_only=True))
    model.eval()
    with torch.no_grad():
        # Pages in the convolution code and sets up its kernels: not the method's memory.
        model(torch.zeros(1, *image.shape[:1], *(64,) * (image.ndim - 1)))
    reset_peak()
    base = resident_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    result = _run(spec, model, image)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (resident_kib("VmHWM") - base) / 1024
    total = resident_kib("VmHWM") / 1024
    reference = Path(folder, "reference.npy")
    if spec["method"] == "whole":
        np.save(reference, result)
    output = "logits" if spec["method"] != "haloseg" else spec["output"]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": peak,
        "process_peak_mib": total,
        **_compare(result, output, reference),
    }


def _specs(sc: Scenario) -> list[dict[str, Any]]:
    whole = {"method": "whole", "settings": "one forward pass"}
    tiled = [
        {"method": "haloseg", "output": o, "tile": t, "settings": f"tile {t}, {o}"}
        for o, t in sc.haloseg
    ]
    monai = [
        {"method": "monai", "roi": r, "overlap": o, "settings": f"roi {r}, overlap {o}, gaussian"}
        for r, o in sc.monai
    ]
    monai += [
        {"method": "monai", "roi": r, "overlap": o, "channels_last": True,
         "settings": f"roi {r}, overlap {o}, gaussian, channels-last model"}
        for r, o in sc.monai_channels_last
    ]  # fmt: skip
    return [whole, *tiled, *monai]


def _work(spec: dict[str, Any], shape: tuple[int, ...]) -> float:
    """Voxels through the network per image voxel."""
    dims = len(shape)
    if spec["method"] == "whole":
        return 1.0
    if spec["method"] == "haloseg":
        rf = receptive_field(_model(dims).eval(), dims)
        tiles = plan_tiles(shape, aligned_tile([spec["tile"]] * dims, rf.alignment), rf)
        return count_voxels(tiles)[0] / math.prod(shape)
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi = (spec["roi"],) * dims
    interval = _get_scan_interval(shape, roi, dims, (spec["overlap"],) * dims)
    return len(dense_patch_slices(shape, roi, interval)) * math.prod(roi) / math.prod(shape)


def _is_labels(r: dict[str, Any]) -> bool:
    return r["method"] == "haloseg" and r["output"] == "labels"


def _add_speedups(rows: list[dict[str, Any]]) -> None:
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


def _scenario(name: str, threads: int, allocator: str, timeout: float) -> list[dict[str, Any]]:
    sc = SCENARIOS[name]
    env = NEUTRAL if allocator == "neutral" else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="haloseg-bench-infer-") as folder:
        log.info("%s: training the network and writing the image", name)
        start = time.perf_counter()
        (trained,) = run_distributed(_prepare, 1, name, folder, threads=threads, timeout=timeout)
        log.info("%s: prepared in %.0f s", name, time.perf_counter() - start)
        for spec in _specs(sc):
            log.info("%s: %s, %s", name, spec["method"], spec["settings"])
            work = _work(spec, sc.shape)
            (out,) = run_distributed(
                _worker, 1, spec, folder, threads=threads, env=env, timeout=timeout
            )
            log.info("%s: %.1f s, %.0f MiB", name, out["wall_s"], out["peak_mib"])
            head = {"scenario": name, "shape": list(sc.shape), "threads": threads,
                    "allocator": allocator}  # fmt: skip
            rows.append({**head, **spec, "work": work, **out, **trained})
    return rows


def run_inference_benchmark(
    scenarios: list[str], *, threads: int = 1, allocator: str = "default", timeout: float = 3600.0
) -> list[dict[str, Any]]:
    """Every configuration of each scenario, one fresh process after another; the rows.

    ``threads``: torch threads per process. ``allocator``: ``default`` (glibc as is: the
    resident set a user sees) or ``neutral`` (``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors
    go back to the OS, so the peak tracks live tensors; large allocations get slower).
    """
    if allocator not in ("default", "neutral"):
        raise ConfigError(f"allocator={allocator!r} must be 'default' or 'neutral'")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenario(s) {unknown}; pick from {', '.join(SCENARIOS)}")
    rows = [r for name in scenarios for r in _scenario(name, threads, allocator, timeout)]
    _add_speedups(rows)
    return rows


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
