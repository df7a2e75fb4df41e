"""``Pipeline``: this process's stage of a network cut into pipeline stages, trained with the
GPipe or 1F1B schedule of ``torch.distributed.pipelining``.

Each stage is a ``PipelineStage`` given its boundary shapes (``input_args`` /
``output_args``): PyTorch's own inference of them would run the stage on meta tensors or
send them between ranks, and BatchNorm cannot run on meta tensors. The shapes come from one
sample run through every stage on this rank, forward only with the statistics frozen, so
every rank of a replica meets a layout the network cannot run (a grid too fine for a deep
level, an image the wrong size) in that run, before any message of the schedule.

Micro-batch ``k``'s loss is divided by the number of micro-batches ``M`` before its
backward, and the schedule's own ``scale_grads`` is off: it would divide every gradient the
stage holds after the step, gradients accumulated before it included. So one step's
gradients equal gradient accumulation of ``loss_k / M`` in one process, and BatchNorm, which
sees each micro-batch once, updates its running statistics once per micro-batch as there.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from haloseg.errors import ConfigError
from haloseg.parallel import Decomposition, spatial_parallel
from haloseg.parallel.alignment import check_alignment, downsampling_factor
from haloseg.pipeline.loss import segmentation_loss
from haloseg.pipeline.mesh import PipelineLayout
from haloseg.pipeline.stage import (
    Context,
    Stage,
    as_blocks,
    check_balance,
    stage_cuts,
    standard_layout,
)

__all__ = ["SCHEDULES", "Pipeline"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_KEPT = 8
"""Schedules kept (one per batch shape, micro-batch count and mode)."""

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Meta = tuple[torch.Size, torch.dtype]


class Pipeline:
    """This process's stage of ``model`` cut into ``layout.stages`` pipeline stages.

    ``model``, a haloseg ``UNet`` or a ``SkipSequence`` not yet converted, is converted in
    place with ``spatial_parallel`` on ``layout.dec`` (every rank keeps all of its weights;
    each trains its stage's). ``balance`` gives the blocks per stage; unset, it is measured
    on ``example`` (one micro-batch of this rank's input blocks) by
    ``haloseg.pipeline.balance.auto_balance``. ``loss(logits, target)`` is the loss of one
    micro-batch on the last stage's blocks (default: cross-entropy + soft Dice of a target
    packed by ``pack_target``). ``context`` (e.g. autocast) wraps every stage forward and
    loss. Every rank constructs it at the same time.
    """

    def __init__(
        self, model: nn.Module, layout: PipelineLayout, *, microbatches: int,
        schedule: str = "1f1b", balance: list[int] | None = None,
        example: torch.Tensor | None = None, loss: Loss | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        context: Context | None = None,
    ) -> None:  # fmt: skip
        _check_schedule(schedule, microbatches, layout.stages)
        layout = _spatial_layout(layout, model)
        seq = as_blocks(model)
        if balance is None:
            balance = _measured_balance(model, seq, layout, example, microbatches, schedule)
        self.balance = check_balance(balance, layout.stages, len(seq))
        # A stage alone on its image and its batch (no grid, no replicas) runs the plain
        # modules: one block is the whole image, and nothing needs gathering.
        dec: Decomposition | None = None
        if dist.get_world_size(layout.stage_group) > 1:
            spatial_parallel(model, layout.dec, sync_gradients=False)
            _batch_norm_over_stage(model, layout)
            dec = layout.dec
        else:  # the image sizes the converted network would check, checked here
            layout.dec.align = max(
                layout.dec.align, downsampling_factor(model, layout.dec.spatial_dims)
            )
        cuts = stage_cuts(self.balance)
        self.stages = [Stage(seq, a, b, dec=dec, memory_format=memory_format,
                             context=context)
                       for a, b in zip(cuts[:-1], cuts[1:], strict=True)]  # fmt: skip
        self.stage = self.stages[layout.stage]
        """This rank's stage: its blocks are its submodules."""
        self.model, self.layout, self.microbatches = model, layout, microbatches
        self.schedule, self.context = schedule, context
        self.loss = loss if loss is not None else segmentation_loss(layout.dec)
        self._boundaries: dict[tuple, list[list[Meta]]] = {}
        self._schedules: OrderedDict[tuple, object] = OrderedDict()

    # -- steps ---------------------------------------------------------------------------
    def step(
        self, x: torch.Tensor, target: torch.Tensor | None = None, *, sync_gradients: bool = True
    ) -> float | None:
        """One pass of the schedule over the batch ``x (N, C, *block)``, ``N`` a multiple of
        the micro-batches, and its ``target (N, ...)``; gradients accumulate into this
        stage's parameters. Every rank passes its block of ``x`` (its shape, checked on
        every rank, fixes the boundary shapes; only the first stage reads the values); the
        last stage needs ``target``, the others may pass it or None. With
        ``sync_gradients`` the stage's gradients are then summed over space and averaged
        over data replicas (``reduce_gradients``). Returns the mean micro-batch loss on the
        last stage, None on the others."""
        n = x.shape[0]
        if n % self.microbatches or (target is not None and target.shape[0] != n):
            got = "" if target is None else f" and {target.shape[0]} targets"
            raise ConfigError(
                f"a batch of {n} images{got} does not split into microbatches="
                f"{self.microbatches}; give the same multiple of {self.microbatches} images "
                "and targets"
            )
        if target is None and self.layout.is_last:
            raise ConfigError("the last pipeline stage computes the loss; pass it the target")
        schedule = self._schedule(x, self.microbatches, train=True)
        losses: list[torch.Tensor] = []
        args = (standard_layout(x),) if self.layout.is_first else ()
        extra = {"target": target, "losses": losses} if self.layout.is_last else {}
        schedule.step(*args, return_outputs=False, **extra)  # type: ignore[attr-defined]
        if sync_gradients:
            self.reduce_gradients()
        return sum(float(v.detach()) for v in losses) if self.layout.is_last else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The network's output on ``x`` (every rank passes its block), forward only, in
        ``gcd(N, microbatches)`` micro-batches: the output's block on the last stage, None on
        the others."""
        schedule = self._schedule(x, math.gcd(x.shape[0], self.microbatches), train=False)
        args = (standard_layout(x),) if self.layout.is_first else ()
        out = schedule.step(*args)  # type: ignore[attr-defined]
        return out if self.layout.is_last else None

    def reduce_gradients(self) -> None:
        """This stage's gradients summed over its data x space ranks (each block's share of
        every image) and divided by the data replicas; a parameter no rank used keeps
        ``grad=None``, as in one process."""
        group = self.layout.stage_group
        params = [p for p in self.stage.parameters() if p.requires_grad]
        if not params or dist.get_world_size(group) == 1:
            return
        used = torch.tensor([float(p.grad is not None) for p in params],
                            dtype=params[0].dtype, device=params[0].device)  # fmt: skip
        flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None
                            else p.new_zeros(p.numel()) for p in params), used])  # fmt: skip
        dist.all_reduce(flat, group=group)
        offset = 0
        for i, p in enumerate(params):
            total = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if flat[-len(params) + i] > 0:
                p.grad = total / self.layout.data_size

    # -- building ------------------------------------------------------------------------
    def _schedule(self, x: torch.Tensor, microbatches: int, *, train: bool) -> object:
        key = (tuple(x.shape), x.dtype, x.device, microbatches, train)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        sample = (tuple(x.shape[1:]), x.dtype, x.device)
        if sample not in self._boundaries:
            check_alignment(self.layout.dec.bounds_of(x.shape[2:]), self.layout.dec)
            self._boundaries[sample] = self._dry_run(x[:1])
        cuts, s, n = self._boundaries[sample], self.layout.stage, x.shape[0] // microbatches
        stage = PipelineStage(
            self.stage, s, self.layout.stages, x.device,
            input_args=tuple(_meta(m, n, train and s > 0) for m in cuts[s]),
            output_args=tuple(_meta(m, n, train) for m in cuts[s + 1]),
            group=self.layout.pipe_group,
        )  # fmt: skip
        if train:
            schedule = SCHEDULES[self.schedule](stage, microbatches, loss_fn=self._scaled_loss(
                microbatches), scale_grads=False)  # fmt: skip
        else:
            schedule = ScheduleGPipe(stage, microbatches)
        self._schedules[key] = schedule
        if len(self._schedules) > _KEPT:
            self._schedules.popitem(last=False)
        return schedule

    @torch.no_grad()
    def _dry_run(self, sample: torch.Tensor) -> list[list[Meta]]:
        """Shapes and dtypes of the tuple crossing each cut, for one sample like ``sample``:
        every stage run on it in turn, BatchNorm on its running statistics (no update)."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            tensors: tuple[torch.Tensor, ...] = (standard_layout(torch.zeros_like(sample)),)
            found = [[(t.shape, t.dtype) for t in tensors]]
            for stage in self.stages:
                out = stage(*tensors)
                tensors = out if isinstance(out, tuple) else (out,)
                found.append([(t.shape, t.dtype) for t in tensors])
        finally:
            for m, mode in modes.items():
                m.training = mode
        return found

    def _scaled_loss(self, microbatches: int) -> Loss:
        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if self.context is None:
                return self.loss(logits, target) / microbatches
            with self.context():
                return self.loss(logits, target) / microbatches

        return loss


def _meta(meta: Meta, batch: int, grad: bool) -> torch.Tensor:
    shape, dtype = meta
    return torch.empty((batch, *shape[1:]), dtype=dtype, device="meta",
                       requires_grad=grad and dtype.is_floating_point)  # fmt: skip


def _check_schedule(schedule: str, microbatches: int, stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise ConfigError(f"parallel.microbatches={microbatches} must be at least 1")
    if schedule == "1f1b" and microbatches < stages:
        raise ConfigError(
            f"parallel.schedule=1f1b needs at least as many micro-batches as stages, but "
            f"{microbatches} < parallel.pipeline={stages}; set parallel.microbatches (and "
            f"train.batch_size) to at least {stages} or use parallel.schedule=gpipe"
        )


def _measured_balance(
    model: nn.Module, seq: nn.Module, layout: PipelineLayout, example: torch.Tensor | None,
    microbatches: int, schedule: str,
) -> list[int]:  # fmt: skip
    """Blocks per stage measured on ``example`` before the network is converted (rank 0
    measures alone, which the spatial engine's collectives would not allow)."""
    if layout.stages == 1:
        return [len(seq)]  # type: ignore[arg-type]
    if example is None:
        raise ConfigError(
            "a Pipeline without balance measures one: pass example (one micro-batch of this "
            "rank's input blocks) or balance (blocks per stage)"
        )
    from haloseg.pipeline.balance import auto_balance

    align = downsampling_factor(model, example.dim() - 2)
    return auto_balance(seq, layout.stages, example, microbatches=microbatches,  # type: ignore[arg-type]
                        schedule=schedule, align=align)  # fmt: skip


def _spatial_layout(layout: PipelineLayout, model: nn.Module) -> PipelineLayout:
    """``layout`` with a one-block grid of the network's spatial dims where it splits
    nothing (``pipeline_layout``'s default grid knows no dims)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    dec = layout.dec
    if conv is None or dec.size > 1 or dec.spatial_dims == len(conv.kernel_size):
        return layout
    ones = (1,) * len(conv.kernel_size)
    return dataclasses.replace(layout, dec=Decomposition(ones, group=dec.group))


def _batch_norm_over_stage(model: nn.Module, layout: PipelineLayout) -> None:
    """BatchNorm's batch statistics over every replica's images, as ``SyncBatchNorm``
    would: gathered from the stage's data x space ranks."""
    if layout.data_size == 1:
        return
    stats = Decomposition((dist.get_world_size(layout.stage_group),), group=layout.stage_group)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "_hs"):
            m._hs.stats = stats
