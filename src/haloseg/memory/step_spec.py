"""What the memory model predicts from: one training step (``StepSpec``), and what it
predicts: the peak bytes of one device and their parts (``MemoryBreakdown``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from haloseg.config import SWAP_POLICIES
from haloseg.errors import ConfigError

__all__ = ["MemoryBreakdown", "StepSpec", "check_spec"]


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """One training step to predict: the network, the image block, and the memory features."""

    spatial_dims: int
    in_channels: int
    classes: int
    channels: tuple[int, ...]
    """Channels per level, ``depth + 1`` of them."""
    convs_per_level: int = 2
    norm: str = "batch"
    upsampling: str = "transposed"
    image: tuple[int, ...]
    """Whole image, per spatial dim."""
    grid: tuple[int, ...] | None = None
    batch: int = 1
    """Images per device per micro-step."""
    data: int = 1
    """Data-parallel replicas (DDP keeps a second copy of the gradients in its buckets)."""
    dtype_bytes: int = 4
    """Bytes per activation element (4 fp32, 2 bf16 autocast, 8 fp64)."""
    param_bytes: int = 4
    swap: str = "none"
    """none | all | skips | min_bytes | budget."""
    swap_min_bytes: int = 1 << 20
    swap_budget: int = 0
    prefetch: int = 2
    checkpoint: bool = False
    optimizer_states: int = 2
    """Tensors of optimizer state per parameter (AdamW: 2)."""
    loss: str = "dice_ce"
    """dice_ce (the trainer's Dice + cross-entropy with a padding mask) | ce (plain
    ``F.cross_entropy``)."""

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    @property
    def block(self) -> tuple[int, ...]:
        """The largest block of the grid (blocks are aligned to ``2**depth``)."""
        grid = self.grid or (1,) * self.spatial_dims
        a = 2**self.depth
        return tuple(math.ceil(n / g / a) * a for n, g in zip(self.image, grid, strict=True))


@dataclass
class MemoryBreakdown:
    """Predicted peak bytes on one device, and what they are made of."""

    peak: int
    parameters: int
    gradients: int
    optimizer: int
    batch: int
    activations: int
    """Peak of everything the step allocates beyond the above (saved tensors, halos,
    gradients of activations, temporaries)."""
    halos: int
    swapped: int
    """Bytes moved to host memory per step."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def check_spec(spec: StepSpec) -> None:
    """Refuse a step the model cannot replay, saying which field is off."""
    if len(spec.image) != spec.spatial_dims:
        raise ConfigError(
            f"image {spec.image} has {len(spec.image)} dims but spatial_dims={spec.spatial_dims}"
        )
    if spec.grid is not None and len(spec.grid) != spec.spatial_dims:
        raise ConfigError(f"grid {spec.grid} needs one extent per spatial dim of {spec.image}")
    if spec.loss not in ("dice_ce", "ce"):
        raise ConfigError(f"loss={spec.loss!r} is not one of dice_ce, ce")
    if spec.swap not in SWAP_POLICIES:
        raise ConfigError(f"swap={spec.swap!r} is not one of {', '.join(SWAP_POLICIES)}")
