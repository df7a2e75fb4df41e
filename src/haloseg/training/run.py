"""``train``: one run from config to metrics, checkpoints and pictures in its folder."""

from __future__ import annotations

import logging
from typing import Any

from haloseg.config import RunConfig
from haloseg.training.loop import build_trainer, final_metrics, fit
from haloseg.training.report import plot_curve, preview, save_overlays

__all__ = ["train"]

log = logging.getLogger(__name__)


def train(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True, previews: int = 3
) -> dict[str, Any]:
    """Train ``cfg`` on this process (one of ``torchrun``'s, or alone); every rank returns the
    final metrics, rank 0 also writes ``metrics.json``, ``curve.png`` and ``overlays.png``."""
    trainer = build_trainer(cfg, resume=resume)
    fit(trainer, progress=progress)
    metrics = final_metrics(trainer)
    panels = [preview(trainer, i) for i in range(min(previews, len(trainer.val_set)))]
    if trainer.layout.is_main:
        plot_curve(trainer.history, trainer.folder / "curve.png")
        if panels:
            save_overlays(panels, trainer.val_set.num_classes, trainer.folder / "overlays.png")
        log.info("run folder: %s", trainer.folder)
    return metrics
