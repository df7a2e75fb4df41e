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
from typing import Any

from haloseg.bench.inference_report import add_speedups, equal_memory, markdown
from haloseg.bench.inference_scenarios import SCENARIOS, Scenario, scenario_model
from haloseg.bench.inference_worker import measure, prepare
from haloseg.bench.spatial import NEUTRAL
from haloseg.errors import ConfigError
from haloseg.inference import plan_tiles, receptive_field
from haloseg.inference.tiles import aligned_tile, count_voxels
from haloseg.parallel.spawn import run_distributed

# The scenarios, equal_memory and markdown live in the inference_* modules beside this one.
__all__ = ["SCENARIOS", "Scenario", "equal_memory", "markdown", "run_inference_benchmark"]

log = logging.getLogger(__name__)


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
        rf = receptive_field(scenario_model(dims).eval(), dims)
        tiles = plan_tiles(shape, aligned_tile([spec["tile"]] * dims, rf.alignment), rf)
        return count_voxels(tiles)[0] / math.prod(shape)
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi = (spec["roi"],) * dims
    interval = _get_scan_interval(shape, roi, dims, (spec["overlap"],) * dims)
    return len(dense_patch_slices(shape, roi, interval)) * math.prod(roi) / math.prod(shape)


def _scenario(name: str, threads: int, allocator: str, timeout: float) -> list[dict[str, Any]]:
    sc = SCENARIOS[name]
    env = NEUTRAL if allocator == "neutral" else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="haloseg-bench-infer-") as folder:
        log.info("%s: training the network and writing the image", name)
        start = time.perf_counter()
        (trained,) = run_distributed(prepare, 1, name, folder, threads=threads, timeout=timeout)
        log.info("%s: prepared in %.0f s", name, time.perf_counter() - start)
        for spec in _specs(sc):
            log.info("%s: %s, %s", name, spec["method"], spec["settings"])
            work = _work(spec, sc.shape)
            (out,) = run_distributed(
                measure, 1, spec, folder, threads=threads, env=env, timeout=timeout
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
    add_speedups(rows)
    return rows
