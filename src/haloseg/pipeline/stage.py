"""A pipeline stage: the blocks of a ``SkipSequence`` between two cuts as one module, whose
forward takes the tuple crossing its first cut and returns the tuple crossing its last.

The tuple is ``(x, *skips)``: the running activation, then every skip saved before the cut
and taken after it, in the order they were saved (``SkipSequence.live``). A stage that neither
saves nor takes a skip hands it on as it came (the same tensor), so each skip travels stage by
stage to the block that takes it, and its gradient travels back the same way. The last stage
returns the network's output alone.

Tensors cross a cut in the standard contiguous layout: ``PipelineStage`` allocates receive
buffers from shapes (in some releases ignoring strides) and checks the strides it is given.
Inside a stage they run in the model's memory format.

On a spatial decomposition every tensor of the tuple is a block of the same image, and a
stage's forward is one root forward of the spatial engine over all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from haloseg.errors import ConfigError
from haloseg.models.unet import UNet
from haloseg.parallel.convert import partitioned_forward
from haloseg.parallel.decomposition import Decomposition
from haloseg.pipeline.blocks import SkipSequence, unet_blocks

__all__ = ["Stage", "as_blocks", "check_balance", "standard_layout", "stage_cuts"]

Context = Callable[[], contextlib.AbstractContextManager]


def as_blocks(model: nn.Module) -> SkipSequence:
    """``model`` as a ``SkipSequence`` sharing its modules: haloseg's ``UNet`` cut into its
    convolution units, a ``SkipSequence`` as it is; any other network is refused."""
    if isinstance(model, SkipSequence):
        return model
    if isinstance(model, UNet):
        return unet_blocks(model)
    raise ConfigError(
        f"{type(model).__name__} is not a SkipSequence, so it cannot be cut into pipeline "
        "stages; use haloseg's U-Net (a model.preset) or write the network as "
        "haloseg.pipeline.SkipSequence of Blocks"
    )


def check_balance(balance: Sequence[int], stages: int, blocks: int) -> list[int]:
    """``balance`` (blocks per stage) checked against ``stages`` and the network's
    ``blocks``."""
    if stages > blocks:
        raise ConfigError(
            f"parallel.pipeline={stages} stages but the network has only {blocks} blocks; "
            f"use at most {blocks} stages"
        )
    sizes = [int(b) for b in balance]
    if len(sizes) != stages or min(sizes, default=0) < 1 or sum(sizes) != blocks:
        raise ConfigError(
            f"parallel.balance={sizes} must give a positive number of blocks to each of the "
            f"{stages} stages, {blocks} in all (the network's blocks); fix it or leave "
            "parallel.balance unset to balance by measurement"
        )
    return sizes


def stage_cuts(balance: Sequence[int]) -> list[int]:
    """The block each stage starts at, then the end: ``[0, b0, b0 + b1, ..., blocks]``."""
    cuts = [0]
    for b in balance:
        cuts.append(cuts[-1] + b)
    return cuts


def _standard_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def standard_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides are the contiguous ones, else a contiguous copy.

    ``Tensor.contiguous()`` would keep a channels-last tensor of one channel (or one
    sample) as it is: contiguous in PyTorch's sense, but not with the strides a receive
    buffer has."""
    if t.stride() == _standard_strides(t.shape):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class Stage(nn.Module):
    """Blocks ``start..stop-1`` of ``seq``; ``forward(x, *skips)`` takes the skips live at
    ``start`` and returns ``(x, *skips live at stop)``, or the output alone at the end.

    ``dec`` runs the (converted) blocks on its blocks of the image; ``memory_format`` is the
    layout inside the stage; ``context`` (e.g. autocast) wraps the forward.
    """

    def __init__(
        self, seq: SkipSequence, start: int, stop: int, *, dec: Decomposition | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        context: Context | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not 0 <= start < stop <= len(seq):
            raise ConfigError(f"a stage of blocks {start}..{stop - 1} is not within the "
                              f"network's {len(seq)} blocks")  # fmt: skip
        self.start, self.stop = start, stop
        self.is_last = stop == len(seq)
        # Only this stage's blocks are submodules: parameters() is what this stage trains.
        self.blocks = nn.ModuleList(seq.layers[start:stop])
        self._seq = (seq,)
        self.inputs = seq.live(start)
        self.outputs = () if self.is_last else seq.live(stop)
        self._taken = {n for b in seq.specs[start:stop] for n in b.takes}
        self.dec, self.memory_format, self.context = dec, memory_format, context

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor | tuple:
        if len(skips) != len(self.inputs):
            raise ConfigError(
                f"stage of blocks {self.start}..{self.stop - 1} takes the skips "
                f"{list(self.inputs)} after the activation, but got {len(skips)} tensors"
            )
        outer = self.context() if self.context is not None else contextlib.nullcontext()
        spatial = contextlib.nullcontext()
        if self.dec is not None:  # the image itself enters the first stage only
            spatial = partitioned_forward(self.dec, x, *skips, image=self.start == 0)
        with outer, spatial:
            inner = self._inner
            named = {n: inner(t) if n in self._taken else t
                     for n, t in zip(self.inputs, skips, strict=True)}  # fmt: skip
            y = self._seq[0].run(self.start, self.stop, inner(x), named)
        if self.is_last:
            return standard_layout(y)
        # A skip passing through comes back as the very tensor it came in as.
        return tuple(standard_layout(t) for t in (y, *(named[n] for n in self.outputs)))

    def _inner(self, t: torch.Tensor) -> torch.Tensor:
        if self.memory_format == torch.contiguous_format:
            return t
        return t.contiguous(memory_format=self.memory_format)

    def extra_repr(self) -> str:
        blocks = f"blocks {self.start}..{self.stop - 1}"
        return f"{blocks}, takes {list(self.inputs)}, hands on {list(self.outputs)}"
