"""Automatic balance of pipeline stages: measured block costs, a contiguous partition by
dynamic programming that minimises the slowest stage under a memory cap.

Each block's forward + backward time is measured on the device at hand, on its own input
(the median of a few repeats). Its memory is what autograd saves for its backward, counted
through ``saved_tensors_hooks`` (each storage once; allocator-neutral). Both are measured on
a probe image no larger than ``PROBE_VOXELS`` and scaled to the real image by voxel count:
every block of a same-padded U-Net does work and holds memory in proportion to the voxels,
so the shares, and so the balance, do not depend on the size.

A stage ``s`` of ``S`` holds, per micro-batch in flight, its blocks' saved tensors plus the
tuple it received (the activation and the skips crossing its first cut). GPipe keeps all
``M`` micro-batches in flight; 1F1B keeps ``min(M, S - s)``. Weights count four times
(weights, gradients, AdamW's two moments).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from haloseg.errors import ConfigError
from haloseg.pipeline.blocks import SkipSequence

__all__ = [
    "PROBE_VOXELS",
    "BlockCost",
    "StagePlan",
    "auto_balance",
    "even_split",
    "in_flight",
    "measure_blocks",
    "partition",
    "plan_stages",
]

PROBE_VOXELS = 1 << 16
"""Largest probe image (voxels per sample) the blocks are measured on."""

OPTIMIZER_COPIES = 4
"""Weights, gradients and AdamW's two moments."""


@dataclass(frozen=True)
class BlockCost:
    """One block's forward + backward seconds, bytes saved for backward, bytes of the tuple
    crossing the cut before it (activation + live skips), and parameter bytes."""

    name: str
    seconds: float
    saved_bytes: int
    cut_bytes: int
    param_bytes: int


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _saved(fn, *args: torch.Tensor) -> tuple[int, torch.Tensor]:  # noqa: ANN001
    """Bytes autograd saves while ``fn(*args)`` runs (each storage once), and the output."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
        except (RuntimeError, NotImplementedError):
            key = (id(t), t.device.type)
        if key[0] == 0:  # meta tensors have no storage: count each saved tensor
            key = (id(t), "meta")
        seen[key] = max(seen.get(key, 0), _bytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def probe_scale(shape: Sequence[int], align: int) -> tuple[tuple[int, ...], float]:
    """A probe image shape (multiples of ``align``, at most ``PROBE_VOXELS`` voxels where
    possible) for ``shape``, and the voxel ratio ``shape / probe``."""
    probe = list(shape)
    while math.prod(probe) > PROBE_VOXELS and max(probe) > align:
        d = max(range(len(probe)), key=probe.__getitem__)
        probe[d] = max(align, (probe[d] // 2) // align * align)
    return tuple(probe), math.prod(shape) / math.prod(probe)


def measure_blocks(
    seq: SkipSequence, example: torch.Tensor, *, repeats: int = 3, align: int = 1
) -> list[BlockCost]:
    """Costs of every block of ``seq`` for one micro-batch like ``example`` ``(N, C,
    *spatial)``, measured on a probe image (see ``probe_scale``) on ``example``'s device."""
    probe, scale = probe_scale(example.shape[2:], align)
    param = next(seq.parameters(), None)
    dtype = param.dtype if param is not None else example.dtype
    x = torch.randn(*example.shape[:2], *probe, dtype=dtype, device=example.device)
    skips: dict[str, torch.Tensor] = {}
    costs = []
    was_training = seq.training
    state = {k: v.clone() for k, v in seq.state_dict().items()}  # BN statistics stay put
    try:
        for b in seq.specs:
            inputs = [x, *(skips.pop(n) for n in b.takes)]
            cut = _bytes(x) + sum(_bytes(t) for t in skips.values()) + sum(
                _bytes(t) for t in inputs[1:])  # fmt: skip
            times = []
            for _ in range(repeats + 1):
                leaves = [t.detach().requires_grad_() for t in inputs]
                start = time.perf_counter()
                saved, out = _saved(b.module, *leaves)
                out.backward(torch.ones_like(out))
                times.append(time.perf_counter() - start)
            params = sum(_bytes(p) for p in b.module.parameters())
            costs.append(BlockCost(b.name, statistics.median(times[1:]) * scale,
                                   int(saved * scale), int(cut * scale), params))  # fmt: skip
            x = out.detach()
            if b.saves is not None:
                skips[b.saves] = x
    finally:
        seq.zero_grad(set_to_none=True)
        seq.load_state_dict(state)
        seq.train(was_training)
    return costs


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once."""
    return microbatches if schedule == "gpipe" else min(microbatches, stages - stage)


def _stage_memory(costs: Sequence[BlockCost], start: int, stop: int, flight: int) -> int:
    held = sum(c.saved_bytes for c in costs[start:stop]) + costs[start].cut_bytes
    weights = OPTIMIZER_COPIES * sum(c.param_bytes for c in costs[start:stop])
    return flight * held + weights


def partition(
    costs: Sequence[BlockCost], stages: int, *, microbatches: int = 1,
    schedule: str = "1f1b", memory_cap: int | None = None,
) -> list[int]:  # fmt: skip
    """Blocks per stage of the contiguous partition of ``costs`` whose slowest stage is
    fastest, every stage within ``memory_cap`` bytes (ties: the smaller largest memory)."""
    n = len(costs)
    if stages > n:
        raise ConfigError(
            f"parallel.pipeline={stages} stages but the network has only {n} blocks; "
            f"use at most {n} stages"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.seconds)
    inf = (math.inf, math.inf)
    # best[s][i]: (slowest stage, largest memory) of blocks i.. over stages s..stages-1.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = (0.0, 0)
    for s in range(stages - 1, -1, -1):
        flight = in_flight(schedule, s, stages, microbatches)
        for i in range(n - (stages - s), -1, -1):
            for j in range(i + 1, n - (stages - s - 1) + 1):
                mem = _stage_memory(costs, i, j, flight)
                if memory_cap is not None and mem > memory_cap:
                    continue
                rest = best[s + 1][j]
                cand = (max(prefix[j] - prefix[i], rest[0]), max(mem, rest[1]))
                if cand < best[s][i]:
                    best[s][i], cut[s][i] = cand, j
    if best[0][0] == inf:
        need = min(_stage_memory(costs, i, i + 1, in_flight(schedule, 0, stages, microbatches))
                   for i in range(n))  # fmt: skip
        raise ConfigError(
            f"no split into {stages} stages fits a memory cap of {memory_cap} bytes (one block "
            f"alone needs {need}); use more stages, fewer micro-batches or a smaller image"
        )
    sizes, i = [], 0
    for s in range(stages):
        sizes.append(cut[s][i] - i)
        i = cut[s][i]
    return sizes


def even_split(n: int, stages: int) -> list[int]:
    """``n`` blocks as evenly as they go into ``stages`` (the first stages one more)."""
    return [n // stages + (s < n % stages) for s in range(stages)]


@dataclass(frozen=True)
class StagePlan:
    """What a balance predicts: per-stage blocks, seconds and bytes; the step and bubble."""

    sizes: tuple[int, ...]
    first: tuple[str, ...]
    last: tuple[str, ...]
    seconds: tuple[float, ...]
    memory: tuple[int, ...]
    microbatches: int

    @property
    def slowest_over_mean(self) -> float:
        return max(self.seconds) / statistics.fmean(self.seconds)

    @property
    def step_seconds(self) -> float:
        """Fill and drain once, then the slowest stage paces the other micro-batches."""
        return sum(self.seconds) + (self.microbatches - 1) * max(self.seconds)

    @property
    def bubble(self) -> float:
        """Share of the stages' time spent idle during a step."""
        busy = self.microbatches * sum(self.seconds)
        return 1 - busy / (len(self.seconds) * self.step_seconds)

    @property
    def speedup(self) -> float:
        """Predicted against one stage running every micro-batch."""
        return self.microbatches * sum(self.seconds) / self.step_seconds


def plan_stages(
    costs: Sequence[BlockCost], sizes: Sequence[int], *, microbatches: int = 1,
    schedule: str = "1f1b",
) -> StagePlan:  # fmt: skip
    """The prediction for blocks split as ``sizes`` (per micro-batch of the costs)."""
    bounds = [0]
    for k in sizes:
        bounds.append(bounds[-1] + k)
    pairs = list(zip(bounds[:-1], bounds[1:], strict=True))
    return StagePlan(
        tuple(sizes), tuple(costs[a].name for a, _ in pairs),
        tuple(costs[b - 1].name for _, b in pairs),
        tuple(sum(c.seconds for c in costs[a:b]) for a, b in pairs),
        tuple(_stage_memory(costs, a, b, in_flight(schedule, s, len(sizes), microbatches))
              for s, (a, b) in enumerate(pairs)),
        microbatches,
    )  # fmt: skip


def auto_balance(
    seq: SkipSequence, stages: int, example: torch.Tensor, *, memory_cap: int | None = None,
    microbatches: int = 1, schedule: str = "1f1b", align: int = 1,
) -> list[int]:  # fmt: skip
    """Blocks per stage for ``seq`` cut into ``stages``, measured on ``example``'s device
    for micro-batches like ``example``. Under ``torch.distributed``, rank 0 measures and
    every rank receives its answer (timings differ between processes)."""
    import torch.distributed as dist

    if stages > len(seq):
        partition([BlockCost("", 0.0, 0, 0, 0)] * len(seq), stages)  # the one-line refusal
    distributed = dist.is_available() and dist.is_initialized()
    answer: list[object] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            costs = measure_blocks(seq, example, align=align)
            answer[0] = partition(costs, stages, microbatches=microbatches, schedule=schedule,
                                  memory_cap=memory_cap)  # fmt: skip
        except ConfigError as e:
            answer[0] = str(e)
    if distributed:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise ConfigError(answer[0])
    return list(answer[0])  # type: ignore[arg-type]
