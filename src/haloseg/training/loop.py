"""The training loop: step, validate, log, checkpoint. Top to bottom.

``build_trainer`` (``training.build``) prepares a run, ``fit`` trains it, ``final_metrics``
(``training.summary``) reports it; ``Trainer`` (``training.trainer``) holds its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from haloseg.resident import reset_peak, resident_kib
from haloseg.training.build import build_trainer
from haloseg.training.summary import final_metrics
from haloseg.training.trainer import Trainer

__all__ = ["StepCallback", "Trainer", "build_trainer", "final_metrics", "fit"]


def _rss_mib(field: str) -> float:
    kib = resident_kib(field)
    return float("nan") if kib is None else kib / 1024


StepCallback = Callable[[Trainer, dict[str, float]], None]
"""Called after each training step with the step's record (loss, lr, validation metrics)."""


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  dice {task.fields[dice]}"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )  # fmt: skip


def _tensorboard(trainer: Trainer) -> Any:
    if not trainer.layout.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(trainer.folder / "tensorboard"), purge_step=trainer.step)


def fit(trainer: Trainer, *, progress: bool = True, on_step: StepCallback | None = None) -> None:
    """Train to the last step, validating, logging and checkpointing on the way;
    ``on_step(trainer, record)`` runs after each step, once its checkpoint (if due) is written."""
    writer = _tensorboard(trainer)
    try:
        _steps(trainer, writer, progress, on_step)
    finally:
        if writer is not None:
            writer.close()


def _steps(trainer: Trainer, writer: Any, progress: bool, on_step: StepCallback | None) -> None:
    t = trainer.cfg.train
    dice = "-"
    with _progress(progress and trainer.layout.is_main) as bar:
        task = bar.add_task("train", total=t.steps, completed=trainer.step, loss=0.0, dice=dice)
        while trainer.step < t.steps:
            reset_peak()
            before = _rss_mib("VmRSS")
            start = time.perf_counter()
            loss = trainer.train_step()
            trainer.step_seconds.append(time.perf_counter() - start)
            peak = _rss_mib("VmHWM")
            trainer.peak_rss_mib = max(trainer.peak_rss_mib, peak)
            trainer.peak_step_mib = max(trainer.peak_step_mib, peak - before)
            record = {"step": trainer.step, "loss": loss, "lr": trainer.scheduler.get_last_lr()[0]}
            due = trainer.step % t.val_every == 0 or trainer.step == t.steps
            if due and len(trainer.val_set):
                record.update(trainer.validate())
                dice = f"{record['dice_mean']:.3f}"
            trainer.history.append(record)
            if writer is not None and (trainer.step % t.log_every == 0 or "val_loss" in record):
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, trainer.step)
            if trainer.step % t.checkpoint_every == 0 or trainer.step == t.steps:
                trainer.save()
            bar.update(task, completed=trainer.step, loss=loss, dice=dice)
            if on_step is not None:
                on_step(trainer, record)
