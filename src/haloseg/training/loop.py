"""The training loop: read this rank's blocks, step, validate, checkpoint. Top to bottom.

Every data replica takes its own images of each step's batch; every rank of a replica's
spatial group takes one block of each. Sample order and augmentation depend only on
(seed, position in the stream), so a resumed run draws exactly what the uninterrupted run
would have drawn.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from haloseg.config import RunConfig, save_config
from haloseg.data.base import Dataset
from haloseg.errors import ConfigError
from haloseg.memory.savers import step_context
from haloseg.parallel import cross_entropy, soft_dice_loss
from haloseg.resident import reset_peak, resident_kib
from haloseg.training.checkpoint import load_checkpoint, save_checkpoint
from haloseg.training.metrics import DiceTracker
from haloseg.training.samples import Augment, Block, draw_augment, padded_shape, read_block
from haloseg.training.setup import (
    Layout,
    agree,
    build_datasets,
    build_model,
    init_layout,
    prepare_run_folder,
)
from haloseg.training.spec import RunSpec, describe_run, write_spec

__all__ = ["Trainer", "build_trainer", "final_metrics", "fit"]

log = logging.getLogger(__name__)


def _rss_mib(field: str) -> float:
    kib = resident_kib(field)
    return float("nan") if kib is None else kib / 1024


@dataclass
class Trainer:
    """State of one run on this rank."""

    cfg: RunConfig
    layout: Layout
    train_set: Dataset
    val_set: Dataset
    model: nn.Module
    weights: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    folder: Path
    dtype: torch.dtype
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    """Largest resident set of this process during a training step."""
    peak_step_mib: float = 0.0
    """Largest rise of the resident set during a training step (what the step allocates)."""
    swapper: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    """Around each forward and backward: activation swapping (``memory.swap``), or nothing."""
    spec: RunSpec | None = None
    """What inference needs to rebuild the model and its preprocessing (saved with it)."""

    # -- data ------------------------------------------------------------------------------
    def padded(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape an image of ``shape`` is trained at (itself unless padding is on)."""
        if not self.cfg.data.pad:
            return shape
        return padded_shape(shape, self.layout.dec.align, self.layout.dec.grid)

    def batch(self, dataset: Dataset, items: list[tuple[int, Augment]]) -> Block:
        """Blocks of ``items`` (sample index, augmentation) stacked into a batch."""
        shapes = {self.padded(a.shape(dataset.info(i).shape)) for i, a in items}
        if len(shapes) > 1:
            raise ConfigError(
                f"a batch mixes images of shapes {sorted(shapes)}; use train.batch_size=1 "
                "for datasets of differently sized images"
            )
        (padded,) = shapes
        data, dec = self.cfg.data, self.layout.dec
        read = functools.partial(read_block, dataset, dec=dec, padded=padded,
                                 normalize=data.normalize, dtype=self.dtype,
                                 ignore_label=data.ignore_label)  # fmt: skip
        blocks = [read(i, aug=a) for i, a in items]
        dev = self.layout.device
        return Block(
            torch.stack([b.image for b in blocks]).to(dev),
            torch.stack([b.label for b in blocks]).to(dev),
            torch.stack([b.valid for b in blocks]).to(dev),
        )

    def _draw(self, micro: int) -> list[tuple[int, Augment]]:
        """This replica's (sample, augmentation) pairs of micro-step ``micro`` of the run."""
        t, n = self.cfg.train, len(self.train_set)
        first = (micro * self.layout.data_size + self.layout.data_rank) * t.batch_size
        items = []
        for position in range(first, first + t.batch_size):
            epoch = position // n
            order = np.random.default_rng([t.seed, epoch]).permutation(n)
            index = int(order[position % n])
            if self.cfg.data.augment:
                rng = np.random.default_rng([t.seed, epoch, position])
                aug = draw_augment(self.train_set.info(index).shape, rng)
            else:
                aug = Augment.identity(self.train_set.spatial_dims)
            items.append((index, aug))
        return items

    # -- steps -----------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, batch: Block) -> torch.Tensor:
        t, dec = self.cfg.train, self.layout.dec
        ce = cross_entropy(logits, batch.label, dec, valid=batch.valid)
        # Softmax sums in at least fp32 under bf16 autocast.
        wide = logits if logits.dtype == torch.float64 else logits.float()
        dice = soft_dice_loss(wide, batch.label, dec, valid=batch.valid)
        return t.ce_weight * ce + t.dice_weight * dice

    def _autocast(self) -> contextlib.AbstractContextManager:
        on = self.cfg.train.amp and self.layout.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def train_step(self) -> float:
        """One optimizer step over ``accumulate`` micro-steps; the loss of the whole batch."""
        t = self.cfg.train
        self.model.train()
        total = 0.0
        for k in range(t.accumulate):
            micro = self.step * t.accumulate + k
            batch = agree(lambda m=micro: self.batch(self.train_set, self._draw(m)))
            sync = k == t.accumulate - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.swapper:
                    with self._autocast():
                        loss = self._loss(self.model(batch.image), batch) / t.accumulate
                    loss.backward()
            total += loss.item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._mean_over_replicas(total)

    def _mean_over_replicas(self, value: float) -> float:
        if self.layout.data_size == 1:
            return value
        v = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(v, group=self.layout.data_group)
        return v.item() / self.layout.data_size

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and Dice over the validation images (each replica takes its share)."""
        self.model.eval()
        tracker = DiceTracker(self.val_set.num_classes, self.cfg.data.regions)
        identity = Augment.identity(self.val_set.spatial_dims)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for index in range(self.layout.data_rank, len(self.val_set), self.layout.data_size):
            # Replicas may hold different numbers of validation images: agree within the
            # spatial group, whose ranks always read the same image.
            batch = agree(lambda i=index: self.batch(self.val_set, [(i, identity)]),
                          self.layout.dec.group)  # fmt: skip
            with self._autocast():
                logits = self.model(batch.image)
            loss_sum += torch.tensor([self._loss(logits, batch).item(), 1.0])
            tracker.update(logits.argmax(1), batch.label, batch.valid, self.layout.dec)
        reduce = self.layout.data_size > 1
        if reduce:
            dist.all_reduce(loss_sum, group=self.layout.data_group)
        metrics = tracker.compute(self.layout.data_group, reduce=reduce)
        metrics["val_loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
        return metrics

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.weights.state_dict(),
            "model_args": {
                "spatial_dims": self.train_set.spatial_dims,
                "in_channels": self.train_set.in_channels,
                "out_channels": self.train_set.num_classes,
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "config": self.cfg.to_dict(),
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }

    def save(self) -> None:
        if self.layout.is_main:
            save_checkpoint(self.folder / "checkpoints", self.state(), self.step)

    def restore(self) -> bool:
        state = agree(lambda: load_checkpoint(self.folder / "checkpoints"))
        if state is None:
            return False
        _check_channels(state["model"], self.train_set.in_channels)
        _check_same_model(state["config"], self.cfg)
        try:
            self.weights.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ConfigError(
                f"the checkpoint in {self.folder} does not fit this model "
                f"({str(e).splitlines()[-1].strip()}); resume with the run's own config.yaml"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = int(state["step"]), list(state["history"])
        return True


def _check_same_model(saved: dict[str, Any], cfg: RunConfig) -> None:
    changed = [f"model.{k}" for k, v in saved.get("model", {}).items()
               if getattr(cfg.model, k, v) != v]  # fmt: skip
    if saved.get("data", {}).get("num_classes") != cfg.data.num_classes:
        changed.append("data.num_classes")
    if changed:
        raise ConfigError(
            f"resuming with {', '.join(changed)} changed from the checkpoint's run; resume with "
            "the run's own config.yaml or start a new output_dir"
        )


def _check_channels(weights: dict[str, torch.Tensor], in_channels: int) -> None:
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.dim() > 2)
    if first.shape[1] != in_channels:
        raise ConfigError(
            f"the checkpoint's model takes {first.shape[1]} input channels but the images "
            f"have {in_channels}; use a checkpoint trained on this data or another output_dir"
        )


def _schedule(cfg: RunConfig) -> Any:
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_trainer(cfg: RunConfig, *, resume: bool = False) -> Trainer:
    """Processes, data, model, optimizer and run folder of ``cfg`` (restored if resuming)."""
    train_set, val_set = build_datasets(cfg.data)
    _adopt_dataset_labels(cfg, train_set)
    layout = init_layout(cfg, train_set.spatial_dims)
    folder = Path(cfg.output_dir)
    dtype = getattr(torch, cfg.train.dtype)
    model, weights = build_model(cfg, train_set, layout, dtype)
    optimizer = torch.optim.AdamW(
        weights.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    trainer = Trainer(cfg, layout, train_set, val_set, model, weights, optimizer, scheduler,
                      folder, dtype, swapper=step_context(cfg.memory, weights),
                      spec=describe_run(cfg, train_set))  # fmt: skip
    # Every check before the run folder is touched: a refused run leaves nothing behind.
    # Image sizes against the grid now, not in the middle of the run.
    for dataset in (train_set, val_set):
        shapes = {trainer.padded(dataset.info(i).shape) for i in range(len(dataset))}
        for shape in shapes:
            layout.dec.image_bounds(shape)
        if dataset is train_set and len(shapes) > 1 and cfg.train.batch_size > 1:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} but the images come in shapes "
                f"{sorted(shapes)[:3]}...; use train.batch_size=1 (and train.accumulate) for "
                "datasets of differently sized images"
            )
    if resume and trainer.restore():
        log.info("resuming at step %d", trainer.step)
    agree(lambda: prepare_run_folder(cfg.output_dir, resume=resume))
    if layout.is_main:
        save_config(cfg, folder / "config.yaml")
        write_spec(trainer.spec, folder)
    return trainer


def _adopt_dataset_labels(cfg: RunConfig, dataset: Dataset) -> None:
    """Regions and ignore label a dataset declares (nnU-Net's dataset.json), where the
    config sets none, so the run's config.yaml and spec say what training used."""
    data = cfg.data
    if not data.regions and getattr(dataset, "regions", None):
        data.regions = {k: list(v) for k, v in dataset.regions.items()}
    if data.ignore_label is None and getattr(dataset, "ignore_label", None) is not None:
        data.ignore_label = int(dataset.ignore_label)


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
