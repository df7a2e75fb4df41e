"""A network as a sequence of blocks with named skip tensors: the form pipeline stages cut.

Block ``i`` takes the output of block ``i - 1`` and, after it, the skip tensors named in its
``takes``; a block whose ``saves`` names a skip keeps its output under that name for a later
block. A cut between blocks ``i - 1`` and ``i`` carries the running activation plus every
skip saved before ``i`` and taken at ``i`` or later (``SkipSequence.live(i)``): the stage
boundary's tuple.

``unet_blocks`` writes haloseg's U-Net in this form at the granularity of its convolution
units (conv, norm, activation), sharing the U-Net's modules, so a partition of blocks is a
partition of the U-Net's own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from haloseg.errors import ConfigError
from haloseg.models.unet import UNet

__all__ = ["Block", "SkipSequence", "unet_blocks"]


@dataclass(frozen=True)
class Block:
    """One step of a ``SkipSequence``: ``module(x, *skips named in takes)``."""

    name: str
    module: nn.Module
    takes: tuple[str, ...] = ()
    """Skips passed after the running activation, in this order; each is taken once."""
    saves: str | None = None
    """Keep this block's output as the skip of this name (it also runs on)."""


class SkipSequence(nn.Module):
    """``blocks`` run one after another, skips handed from the block that saves them to the
    block that takes them. Its forward is the whole network, for one process."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("a SkipSequence needs at least one Block")
        saved: dict[str, int] = {}
        taken: set[str] = set()
        for i, b in enumerate(blocks):
            for name in b.takes:
                if name not in saved or name in taken:
                    why = "is taken twice" if name in taken else "is not saved by an earlier block"
                    raise ConfigError(
                        f"block {i} ({b.name}) takes skip {name!r}, which {why}; each skip is "
                        "saved by one block and taken by one later block"
                    )
                taken.add(name)
            if b.saves is not None:
                if b.saves in saved:
                    raise ConfigError(f"block {i} ({b.name}) saves skip {b.saves!r} again")
                saved[b.saves] = i
        unused = sorted(set(saved) - taken)
        if unused:
            raise ConfigError(f"skip(s) {', '.join(unused)} are saved but no block takes them")
        self.specs = tuple(blocks)
        self.layers = nn.ModuleList(b.module for b in blocks)
        self._saved_at = saved
        self._taken_at = {n: i for i, b in enumerate(blocks) for n in b.takes}

    def __len__(self) -> int:
        return len(self.specs)

    def live(self, i: int) -> tuple[str, ...]:
        """Skips crossing the cut before block ``i``: saved before it, taken at or after it
        (in the order they were saved)."""
        names = [n for n, s in self._saved_at.items() if s < i <= self._taken_at[n]]
        return tuple(sorted(names, key=self._saved_at.__getitem__))

    def run(
        self, start: int, stop: int, x: torch.Tensor, skips: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Blocks ``start..stop-1`` on ``x``, taking from and saving into ``skips``."""
        for b in self.specs[start:stop]:
            x = b.module(x, *(skips.pop(n) for n in b.takes))
            if b.saves is not None:
                skips[b.saves] = x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(0, len(self.specs), x, {})


class _Join(nn.Module):
    """A decoder level's first unit: the (cropped) skip and the up-sampled features
    concatenated over channels, then the unit."""

    def __init__(self, unit: nn.Module, crop: nn.Module | None) -> None:
        super().__init__()
        self.unit, self.crop = unit, crop

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.crop is not None:
            skip = self.crop(skip)
        return self.unit(torch.cat([skip, x], dim=1))


def _units(level: nn.Sequential) -> list[nn.Sequential]:
    """A level's layers cut before each convolution: (conv, norm, activation) units."""
    groups: list[list[nn.Module]] = []
    for layer in level:
        if isinstance(layer, nn.modules.conv._ConvNd) or not groups:
            groups.append([])
        groups[-1].append(layer)
    return [nn.Sequential(*g) for g in groups]


def unet_blocks(unet: UNet) -> SkipSequence:
    """haloseg's ``UNet`` as a ``SkipSequence`` of its convolution units, pools, up-samplings
    and head, sharing its modules; equal to ``unet(x)`` for every ``x``."""
    blocks: list[Block] = []
    for lvl, level in enumerate(unet.encoder):
        units = _units(level)
        for u, unit in enumerate(units):
            last = u == len(units) - 1 and lvl < unet.depth
            blocks.append(Block(f"encoder.{lvl}.{u}", unit, saves=f"skip{lvl}" if last else None))
        if lvl < unet.depth:
            blocks.append(Block(f"pools.{lvl}", unet.pools[lvl]))
    for i, (up, level) in enumerate(zip(unet.ups, unet.decoder, strict=True)):
        lvl = unet.depth - 1 - i
        blocks.append(Block(f"ups.{i}", up))
        crop = unet.crops[i] if len(unet.crops) else None
        for u, unit in enumerate(_units(level)):
            if u == 0:
                blocks.append(Block(f"decoder.{i}.0", _Join(unit, crop), takes=(f"skip{lvl}",)))
            else:
                blocks.append(Block(f"decoder.{i}.{u}", unit))
    blocks.append(Block("head", unet.head))
    return SkipSequence(blocks)
