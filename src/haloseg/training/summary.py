"""What a run measured: final validation metrics, step time, throughput and peak memory,
written by rank 0 as ``metrics.json``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch.distributed as dist

from haloseg.training.trainer import Trainer

__all__ = ["final_metrics"]


def _costs(trainer: Trainer) -> dict[str, float | None]:
    """Median step time, throughput and peak memory of the steps this session ran."""
    times = trainer.step_seconds[1:] or trainer.step_seconds
    if not times:
        return dict.fromkeys(
            ("step_seconds_median", "images_per_second", "peak_rss_mib", "peak_step_mib")
        )
    t = trainer.cfg.train
    median = float(np.median(times))
    return {
        "step_seconds_median": median,
        "images_per_second": t.batch_size * t.accumulate * trainer.layout.data_size / median,
        "peak_rss_mib": trainer.peak_rss_mib,
        "peak_step_mib": trainer.peak_step_mib,
    }


def final_metrics(trainer: Trainer) -> dict[str, Any]:
    """Final metrics (every rank); rank 0 writes ``metrics.json``."""
    last = next((h for h in reversed(trainer.history) if "val_loss" in h), None)
    if last is None:
        last = {"step": trainer.step}
        if len(trainer.val_set):
            last.update(trainer.validate())
    metrics = {
        **{k: v for k, v in last.items() if k not in ("lr",)},
        "steps": trainer.step,
        **_costs(trainer),
        "processes": trainer.layout.world,
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "grid": list(trainer.layout.dec.grid),
        "data_parallel": trainer.layout.data_size,
    }
    path = trainer.folder / "metrics.json"
    if not trainer.step_seconds and trainer.layout.is_main and path.is_file():
        # Nothing trained in this session (a finished run resumed): keep what was measured.
        before = json.loads(path.read_text())
        metrics.update({k: before[k] for k in _costs(trainer) if k in before})
    if trainer.layout.is_main:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(path)
    return metrics
