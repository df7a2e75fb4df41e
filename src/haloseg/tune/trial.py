"""One trial of a search, without Ray: the base config with the trial's values, trained to
its last step, reporting after every validation together with the checkpoint written there.

Ray's side (``haloseg.tune.trainable``) only carries reports and checkpoints between this
and Tune, so everything here runs, and is tested, in a plain process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from haloseg.config import RunConfig, load_config
from haloseg.training import build_trainer, final_metrics, fit
from haloseg.training.checkpoint import MANIFEST, latest_checkpoint
from haloseg.training.loop import Trainer
from haloseg.tune.space import trial_overrides

__all__ = ["Reporter", "install_checkpoint", "run_trial", "trial_config"]

Reporter = Callable[[dict[str, float], "Path | None"], None]
"""``report(metrics, checkpoint)``: the metrics of a validation and, on the main rank, a
folder holding the checkpoint of that step (None on the other ranks)."""


def trial_config(base: dict[str, Any], values: dict[str, Any], folder: str | Path) -> RunConfig:
    """The config of a trial: ``base`` (a ``RunConfig.to_dict()``) with ``values`` (dotted
    keys), running in ``folder`` and checkpointing at every validation."""
    cfg = load_config(None, trial_overrides(base, values))
    # Tune stops, pauses and restarts a trial where it reports: there it needs a checkpoint.
    train = dataclasses.replace(cfg.train, checkpoint_every=cfg.train.val_every)
    return dataclasses.replace(cfg, output_dir=str(folder), train=train)


def install_checkpoint(source: str | Path, cfg: RunConfig) -> None:
    """Make the checkpoint folder ``source`` (one a trial reported) the one the run of
    ``cfg`` resumes from."""
    target = Path(cfg.output_dir) / "checkpoints"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


@contextlib.contextmanager
def _latest_only(folder: Path) -> Iterator[Path]:
    """A temporary folder with the latest checkpoint of ``folder`` and its manifest: what a
    trial hands to Tune (not the older checkpoint kept beside it)."""
    latest = latest_checkpoint(folder)
    with tempfile.TemporaryDirectory(prefix="haloseg-report-") as tmp:
        for path in (folder / MANIFEST, latest):
            try:
                os.link(path, Path(tmp) / path.name)
            except OSError:
                shutil.copy2(path, Path(tmp) / path.name)
        yield Path(tmp)


def _metrics(trainer: Trainer, record: dict[str, Any]) -> dict[str, float]:
    times = trainer.step_seconds[1:] or trainer.step_seconds
    metrics = {k: v for k, v in record.items() if k != "lr"}
    metrics["step_seconds_median"] = statistics.median(times) if times else float("nan")
    return metrics


def _report(trainer: Trainer, record: dict[str, Any], report: Reporter) -> None:
    metrics = _metrics(trainer, record)
    if not trainer.layout.is_main:
        report(metrics, None)
        return
    with _latest_only(trainer.folder / "checkpoints") as folder:
        report(metrics, folder)


def run_trial(cfg: RunConfig, report: Reporter, *, threads: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` from the checkpoint in its run folder (if any) to its last step, calling
    ``report`` after every validation; the final metrics (written to ``metrics.json``)."""
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    trainer = build_trainer(cfg, resume=True)
    t = cfg.train

    def on_step(trainer: Trainer, record: dict[str, float]) -> None:
        if trainer.step % t.val_every == 0 or trainer.step == t.steps:
            _report(trainer, record, report)

    if trainer.step >= t.steps and trainer.history:
        # Restored at its end: the experiment may have missed the last report (killed in
        # between), and a trial that reports nothing has no result.
        _report(trainer, trainer.history[-1], report)
    fit(trainer, progress=False, on_step=on_step)
    return final_metrics(trainer)
