"""``Trainer``: one run's state on this rank, and its steps: read this rank's blocks of a
batch, one optimizer step, validation.

Every data replica takes its own images of each step's batch; every rank of a replica's
spatial group takes one block of each. Sample order and augmentation depend only on
(seed, position in the stream), so a resumed run draws exactly what the uninterrupted run
would have drawn.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from haloseg.config import RunConfig
from haloseg.data.base import Dataset
from haloseg.errors import ConfigError
from haloseg.parallel import cross_entropy, soft_dice_loss
from haloseg.training.checkpoint import save_checkpoint
from haloseg.training.metrics import DiceTracker
from haloseg.training.resume import restore_trainer, trainer_state
from haloseg.training.samples import Augment, Block, draw_augment, padded_shape, read_block
from haloseg.training.setup import Layout, agree
from haloseg.training.spec import RunSpec
from haloseg.training.tiles import read_tile_block

if TYPE_CHECKING:
    from haloseg.pipeline.train import PipelineTraining

__all__ = ["Trainer"]


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
    memory_format: torch.memory_format = torch.contiguous_format
    """Layout of the weights and of the image batches (``train.memory_format``)."""
    pipeline: PipelineTraining | None = None
    """The network cut into pipeline stages (``parallel.pipeline`` > 1), or None."""

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
        # Tiles mode: each rank reads its block with the halo around it.
        reader = (read_block if self.layout.halo is None
                  else functools.partial(read_tile_block, halo=self.layout.halo))  # fmt: skip
        read = functools.partial(reader, dataset, dec=dec, padded=padded,
                                 normalize=data.normalize, dtype=self.dtype,
                                 ignore_label=data.ignore_label)  # fmt: skip
        blocks = [read(i, aug=a) for i, a in items]
        dev = self.layout.device
        return Block(
            torch.stack([b.image for b in blocks]).to(dev, memory_format=self.memory_format),
            torch.stack([b.label for b in blocks]).to(dev),
            torch.stack([b.valid for b in blocks]).to(dev),
            blocks[0].core,
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
        if self.pipeline is not None:
            return self.pipeline.train_step(self)
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
                        logits = batch.crop(self.model(batch.image))
                        loss = self._loss(logits, batch) / t.accumulate
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
        if self.pipeline is not None:
            return self.pipeline.validate(self)
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
                logits = batch.crop(self.model(batch.image))
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
        """What a checkpoint of this run holds."""
        return trainer_state(self)

    def save(self) -> None:
        """Write a checkpoint of this step (rank 0; every rank holds the same state)."""
        if self.pipeline is not None:  # every rank gathers the stages' weights first
            self.pipeline.sync(self)
        if self.layout.is_main:
            save_checkpoint(self.folder / "checkpoints", self.state(), self.step)

    def restore(self) -> bool:
        """Continue from the run folder's latest checkpoint; False if there is none."""
        return restore_trainer(self)
