"""The planner: which mix of spatial grid, data parallelism, swapping and checkpointing fits.

Every mix is priced by the memory model (``step_memory``) and by the devices it takes; the
cheapest that fits the device is the answer: fewest devices, then the least extra time
(recomputation, host transfers). The tiled alternative (overlapping tiles, no halo exchange)
is priced by its redundant work, ``((core + 2 halo) / core)^d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from haloseg.errors import ConfigError
from haloseg.memory.model import MemoryBreakdown, StepSpec, step_memory

__all__ = [
    "DTYPES",
    "HEADROOM",
    "Mix",
    "PlanRow",
    "balanced_grid",
    "plan",
    "tiled_redundancy",
    "unet_spec",
]

DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}

HEADROOM = 0.9
"""Share of a device's memory a plan may fill: the model leaves out kernel workspaces (cuDNN)
and the allocator's fragmentation, and is calibrated to about 15%."""

SLOWDOWN = {("none", False): 1.0, ("none", True): 1.33, ("skips", False): 1.1,
            ("skips", True): 1.43, ("all", False): 1.5, ("all", True): 1.83}  # fmt: skip
"""Rough step time against the plain step: checkpointing runs each level's forward again
(about a third of a step); swapping costs what the host link cannot hide."""


@dataclass(frozen=True)
class Mix:
    """One way to run the step."""

    grid: tuple[int, ...]
    data: int
    swap: str
    checkpoint: bool

    @property
    def devices(self) -> int:
        return self.data * math.prod(self.grid)

    @property
    def slowdown(self) -> float:
        return SLOWDOWN[(self.swap, self.checkpoint)]

    def describe(self) -> str:
        parts = ["x".join(map(str, self.grid)) + " grid"]
        if self.data > 1:
            parts.append(f"{self.data} data replicas")
        if self.swap != "none":
            parts.append(f"swap {self.swap}")
        if self.checkpoint:
            parts.append("checkpointing")
        return ", ".join(parts)


@dataclass
class PlanRow:
    mix: Mix
    memory: MemoryBreakdown
    fits: bool


def unet_spec(
    *,
    image: tuple[int, ...],
    in_channels: int,
    classes: int,
    channels: int,
    depth: int,
    multiplier: float = 2.0,
    convs_per_level: int = 2,
    norm: str = "batch",
    upsampling: str = "transposed",
    batch: int = 1,
    dtype: str = "fp32",
) -> StepSpec:
    """The ``StepSpec`` of a haloseg UNet with ``channels`` at level 0, on one device."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if depth < 1 or channels < 1 or min(image) < 2**depth:
        raise ConfigError(
            f"image {image} with depth {depth} and {channels} channels: need depth >= 1, "
            f"channels >= 1 and every image side >= 2**depth = {2**depth}"
        )
    levels = tuple(int(round(channels * multiplier**lvl)) for lvl in range(depth + 1))
    return StepSpec(
        spatial_dims=len(image), in_channels=in_channels, classes=classes, channels=levels,
        convs_per_level=convs_per_level, norm=norm, upsampling=upsampling, image=image,
        batch=batch, dtype_bytes=DTYPES[dtype], param_bytes=4 if dtype != "fp64" else 8,
    )  # fmt: skip


def balanced_grid(image: tuple[int, ...], devices: int, align: int) -> tuple[int, ...] | None:
    """Split ``devices`` (a power of two) over the image's dims, halving the largest block
    each time; ``None`` when a block would be thinner than ``align``."""
    grid = [1] * len(image)
    for _ in range(int(math.log2(devices))):
        # The largest block side; on ties the dim split least (less halo surface).
        d = max(range(len(image)), key=lambda i: (image[i] / grid[i], -grid[i]))
        grid[d] *= 2
        if image[d] / grid[d] < align:
            return None
    return tuple(grid)


def plan(
    spec: StepSpec,
    device_memory: int,
    *,
    max_devices: int = 4096,
    swaps: tuple[str, ...] = ("none", "skips", "all"),
    headroom: float = HEADROOM,
) -> list[PlanRow]:
    """Every mix up to ``max_devices``, cheapest first; ``spec.batch`` is the global batch.
    A mix fits when its predicted peak is within ``headroom`` of ``device_memory``."""
    if device_memory <= 0:
        raise ConfigError(f"device memory {device_memory} must be > 0 bytes, like 80GB")
    rows = []
    align = 2**spec.depth
    for data in [d for d in range(1, spec.batch + 1) if spec.batch % d == 0]:
        p = 1
        while data * p <= max_devices:
            grid = balanced_grid(spec.image, p, align)
            if grid is None:
                break
            for swap in swaps:
                for ckpt in (False, True):
                    mix = Mix(grid, data, swap, ckpt)
                    one = replace(spec, grid=grid, batch=spec.batch // data, data=data,
                                  swap=swap, checkpoint=ckpt)  # fmt: skip
                    memory = step_memory(one)
                    rows.append(PlanRow(mix, memory, memory.peak <= headroom * device_memory))
            p *= 2
    rows.sort(key=lambda r: (not r.fits, r.mix.devices, r.mix.slowdown, r.memory.peak))
    return rows


def tiled_redundancy(core: tuple[int, ...], halo: tuple[int, ...]) -> float:
    """Work of overlapping tiles of ``core`` with ``halo`` per side against the image's."""
    return math.prod((c + 2 * h) / c for c, h in zip(core, halo, strict=True))
