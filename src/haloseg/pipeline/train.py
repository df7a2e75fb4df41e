"""A run's training step, validation and checkpoint gathering when its network is cut into
pipeline stages (``parallel.pipeline`` > 1).

Every rank reads its spatial block of each batch (the first stage uses the images, the last
the labels, every rank the shape). A step of ``train.batch_size`` images per replica runs as
``parallel.microbatches`` micro-batches through the schedule, ``train.accumulate`` times
before the optimizer step, so it equals one process accumulating the gradients of the same
micro-batches. The loss lives on the last stage; it and the validation metrics are handed to
every rank over the pipe group.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from haloseg.errors import ConfigError
from haloseg.parallel.alignment import downsampling_factor
from haloseg.pipeline.loss import pack_target, unpack_target
from haloseg.pipeline.runner import Loss, Pipeline
from haloseg.pipeline.state import gather_stages
from haloseg.training.metrics import DiceTracker
from haloseg.training.samples import Augment
from haloseg.training.setup import agree

if TYPE_CHECKING:
    from haloseg.training.trainer import Trainer

__all__ = ["PipelineTraining"]


class PipelineTraining:
    """The pipeline of ``trainer``'s run: its network converted and cut into stages."""

    def __init__(self, trainer: Trainer) -> None:
        cfg, layout = trainer.cfg, trainer.layout
        place = layout.pipeline
        if place is None:
            raise ConfigError("a pipeline's training needs parallel.pipeline > 1")
        microbatches = cfg.parallel.microbatches or cfg.train.batch_size
        # The blocks' alignment, as the conversion will set it: the example's size needs it.
        layout.dec.align = max(
            layout.dec.align, downsampling_factor(trainer.weights, layout.dec.spatial_dims)
        )
        example = None
        if cfg.parallel.balance is None and place.stages > 1:
            example = self._example(trainer, cfg.train.batch_size // microbatches)
        self.place = place
        self.pipe = Pipeline(
            trainer.weights, place, microbatches=microbatches, schedule=cfg.parallel.schedule,
            balance=cfg.parallel.balance, example=example, loss=self._loss(trainer),
            memory_format=trainer.memory_format, context=trainer._autocast,
        )  # fmt: skip

    @staticmethod
    def _example(trainer: Trainer, batch: int) -> torch.Tensor:
        """One micro-batch shaped like this rank's blocks of the first training image."""
        data = trainer.train_set
        box = trainer.layout.dec.box(trainer.padded(data.info(0).shape))
        shape = (batch, data.in_channels, *(hi - lo for lo, hi in box))
        return torch.zeros(shape, dtype=trainer.dtype, device=trainer.layout.device)

    @staticmethod
    def _loss(trainer: Trainer) -> Loss:
        """The trainer's loss of a packed target, divided by ``train.accumulate``."""
        accumulate = trainer.cfg.train.accumulate

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            label, valid = unpack_target(target)
            batch = SimpleNamespace(label=label, valid=valid)
            return trainer._loss(logits, batch) / accumulate  # type: ignore[arg-type]

        return loss

    def _from_last_stage(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=self.place.stage_rank(self.place.stages - 1),
                       group=self.place.pipe_group)  # fmt: skip
        return t.item()

    # -- the trainer's steps -------------------------------------------------------------
    def train_step(self, trainer: Trainer) -> float:
        """``Trainer.train_step`` through the pipeline."""
        t = trainer.cfg.train
        trainer.model.train()
        total = 0.0
        for k in range(t.accumulate):
            micro = trainer.step * t.accumulate + k
            batch = agree(lambda m=micro: trainer.batch(trainer.train_set, trainer._draw(m)))
            loss = self.pipe.step(batch.image, pack_target(batch.label, batch.valid),
                                  sync_gradients=k == t.accumulate - 1)  # fmt: skip
            total += loss or 0.0
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step += 1
        return trainer._mean_over_replicas(self._from_last_stage(total))

    @torch.no_grad()
    def validate(self, trainer: Trainer) -> dict[str, float]:
        """``Trainer.validate`` through the stages, forward only."""
        layout, place = trainer.layout, self.place
        trainer.model.eval()
        tracker = DiceTracker(trainer.val_set.num_classes, trainer.cfg.data.regions)
        identity = Augment.identity(trainer.val_set.spatial_dims)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for index in range(layout.data_rank, len(trainer.val_set), layout.data_size):
            # Every rank of the replica reads the same image: they agree among themselves.
            batch = agree(lambda i=index: trainer.batch(trainer.val_set, [(i, identity)]),
                          place.replica_group)  # fmt: skip
            logits = self.pipe.forward(batch.image)
            if logits is not None:
                loss_sum += torch.tensor([trainer._loss(logits, batch).item(), 1.0])
                tracker.update(logits.argmax(1), batch.label, batch.valid, layout.dec)
        metrics: list[dict[str, float] | None] = [None]
        if place.is_last:
            reduce = layout.data_size > 1
            if reduce:
                dist.all_reduce(loss_sum, group=layout.data_group)
            metrics[0] = tracker.compute(layout.data_group, reduce=reduce)
            metrics[0]["val_loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
        dist.broadcast_object_list(metrics, src=place.stage_rank(place.stages - 1),
                                   group=place.pipe_group)  # fmt: skip
        return metrics[0]  # type: ignore[return-value]

    def sync(self, trainer: Trainer) -> None:
        """Every stage's weights and optimizer state on every rank (before a checkpoint)."""
        gather_stages(self.pipe, trainer.optimizer)
