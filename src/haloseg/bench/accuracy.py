"""The accuracy study (``haloseg bench accuracy``): does training on whole images beat
training on patches where context decides the class, and not where it does not?

Every arm trains the same U-Net from the same initial weights with the same loss, optimizer,
schedule and number of steps, and sees the same voxels per step; arms differ only in how a
step's voxels are cut:

* ``patch P``: ``(S/P)^d`` random patches of side ``P`` (a third on foreground, nnU-Net's
  sampling), predicted by MONAI's sliding window (overlap 0.5, gaussian);
* ``progressive``: the patch sides, then the whole image, over equal shares of the steps;
  predicted on the whole image;
* ``whole``: one whole image per step on the spatial engine (``spatial_parallel`` over a
  grid of gloo processes); predicted on the whole image.

Dice of each object class on held-out images, per seed; ``accuracy_report`` summarises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from haloseg.bench.accuracy_train import PatchSampler, dice_per_class, predict_windows, train
from haloseg.config.checks import check_choice, check_positive
from haloseg.data.context import CONTEXT_MIN_SIDE, CONTEXT_TASKS, ContextDataset
from haloseg.errors import ConfigError
from haloseg.models import unet_preset
from haloseg.parallel import Decomposition, spatial_parallel
from haloseg.parallel.spawn import run_distributed

__all__ = [
    "CLASSES",
    "TEST_SEED",
    "AccuracyConfig",
    "Arm",
    "Stage",
    "arms",
    "config_dict",
    "run_study",
    "run_whole",
]

log = logging.getLogger(__name__)

CLASSES = (1, 2)
"""The object classes scored (0 is background)."""
TEST_SEED = 10_000
"""Seed of the held-out images: one test set for every seed and arm, apart from training."""

Progress = Callable[[int, int, dict[str, Any]], None]
"""``(arms done, arms in all, the record of the arm just done)``."""


@dataclass(kw_only=True)
class AccuracyConfig:
    """One accuracy study."""

    tasks: tuple[str, ...] = CONTEXT_TASKS
    """Tasks of ``haloseg.data.context`` to run."""
    size: int = 128
    """Image side ``S`` (every spatial dim)."""
    spatial_dims: int = 2
    """2 or 3."""
    seeds: int = 3
    """Seeds per task: each draws other training images, initial weights and patches."""
    steps: int = 450
    """Optimizer steps of every arm."""
    patch_fractions: tuple[float, ...] = (0.25, 0.5)
    """Patch sides as fractions of ``size``; each must divide it."""
    progressive: bool = True
    """Also run progressive growth (the patch sides, then the whole image)."""
    whole_grid: tuple[int, ...] | None = None
    """Process grid of the whole-image arm; None: 2x2 (2x2x1 in 3-D)."""
    train_images: int = 32
    """Training images per task and seed."""
    test_images: int = 16
    """Held-out images per task (seed ``TEST_SEED``)."""
    noise: float = 0.3
    """Noise level of the images."""
    depth: int = 4
    """Down-samplings of the U-Net (the small preset's 4: a receptive field 189 voxels wide)."""
    base_channels: int = 8
    """Channels at the U-Net's first level (the small preset's 8)."""
    norm: str = "instance"
    """instance | batch | group: the U-Net's normalisation. Instance, as nnU-Net: batch norm
    over one whole image per step learns statistics that do not hold at inference."""
    lr: float = 3e-3
    """Peak learning rate of AdamW (haloseg train's default)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up before the cosine decay."""
    threads: int | None = None
    """Torch threads of the one-process arms; None: every core of this process."""

    def __post_init__(self) -> None:
        check_choice("spatial_dims", self.spatial_dims, (2, 3))
        check_choice("norm", self.norm, ("batch", "instance", "group"))
        for name in ("size", "seeds", "steps", "train_images", "test_images", "depth",
                     "base_channels", "lr"):  # fmt: skip
            check_positive(name, getattr(self, name))
        for name in ("noise", "weight_decay", "warmup_steps"):
            check_positive(name, getattr(self, name), zero=True)
        if self.threads is not None:
            check_positive("threads", self.threads)
        unknown = [t for t in self.tasks if t not in CONTEXT_TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks={self.tasks}: give one or more of {', '.join(CONTEXT_TASKS)}")
        align = 2**self.depth
        if self.size < CONTEXT_MIN_SIDE:
            raise ConfigError(f"size={self.size} is under the tasks' least side {CONTEXT_MIN_SIDE}")
        if self.size % align:
            raise ConfigError(
                f"size={self.size} is not a multiple of 2**depth={align}; use "
                f"{max(align, self.size // align * align)} or {(self.size // align + 1) * align}"
            )
        for f in self.patch_fractions:
            side = self.size * f
            if not 0 < f < 1 or side != int(side) or self.size % int(side) or side % align:
                raise ConfigError(
                    f"patch fraction {f} of size {self.size} gives side {side:g}; give "
                    f"fractions in (0, 1) whose side divides {self.size} and is a multiple "
                    f"of {align}, e.g. 0.25 0.5"
                )
        grid = self.grid
        if len(grid) != self.spatial_dims or min(grid) < 1:
            raise ConfigError(
                f"whole_grid={grid} must give {self.spatial_dims} extents >= 1, e.g. "
                + ("2x2" if self.spatial_dims == 2 else "2x2x1")
            )
        if any(self.size // g < align for g in grid):
            raise ConfigError(
                f"whole_grid={grid} cuts size {self.size} into blocks under 2**depth={align}; "
                "use a smaller grid or a larger size"
            )

    @property
    def patch_sides(self) -> tuple[int, ...]:
        """Patch sides in voxels, smallest first."""
        return tuple(sorted(int(self.size * f) for f in self.patch_fractions))

    @property
    def grid(self) -> tuple[int, ...]:
        """Process grid of the whole-image arm."""
        if self.whole_grid is not None:
            return tuple(self.whole_grid)
        return (2, 2) if self.spatial_dims == 2 else (2, 2, 1)


@dataclass(frozen=True)
class Stage:
    """A stretch of an arm's steps with one patch side."""

    side: int
    """Patch side (the image side for whole images)."""
    batch: int
    """Patches per step: ``(S / side)^d``, so every step holds ``S^d`` voxels."""
    steps: int
    """Steps of this stretch."""


@dataclass(frozen=True)
class Arm:
    """One way to feed the training steps."""

    name: str
    """``patch P``, ``progressive`` or ``whole``."""
    kind: str
    """patch | progressive | whole."""
    stages: tuple[Stage, ...]
    """What each stretch of steps is fed, in order."""

    def voxels_seen(self, spatial_dims: int) -> int:
        """Voxels through the network over all steps (the budget)."""
        return sum(s.side**spatial_dims * s.batch * s.steps for s in self.stages)


def arms(cfg: AccuracyConfig) -> list[Arm]:
    """The study's arms, with equal budgets: ``steps`` steps of ``size^d`` voxels each."""
    d, n = cfg.spatial_dims, cfg.size

    def stage(side: int, steps: int) -> Stage:
        return Stage(side, (n // side) ** d, steps)

    out = [Arm(f"patch {p}", "patch", (stage(p, cfg.steps),)) for p in cfg.patch_sides]
    if cfg.progressive:
        sides = (*cfg.patch_sides, n)
        bounds = [round(cfg.steps * k / len(sides)) for k in range(len(sides) + 1)]
        stages = tuple(stage(p, b - a) for p, a, b in zip(sides, bounds, bounds[1:]))
        out.append(Arm("progressive", "progressive", stages))
    out.append(Arm("whole", "whole", (stage(n, cfg.steps),)))
    return out


@dataclass
class _Data:
    images: np.ndarray
    """(N, 1, *spatial) float32."""
    labels: np.ndarray
    """(N, *spatial) int64."""


def _load(task: str, cfg: AccuracyConfig, seed: int, count: int) -> _Data:
    ds = ContextDataset(task, (cfg.size,) * cfg.spatial_dims, count, seed=seed, noise=cfg.noise)
    pairs = [ds.read(i, [(0, n) for n in ds.info(i).shape]) for i in range(len(ds))]
    return _Data(np.stack([p[0] for p in pairs]).astype(np.float32),
                 np.stack([p[1] for p in pairs]).astype(np.int64))  # fmt: skip


def _model(cfg: AccuracyConfig, seed: int) -> nn.Module:
    # The seed alone fixes the weights: every arm, and every rank, starts from the same ones.
    torch.manual_seed(seed)
    return unet_preset("small", spatial_dims=cfg.spatial_dims, in_channels=1,
                       out_channels=len(CLASSES) + 1, depth=cfg.depth,
                       base_channels=cfg.base_channels, norm=cfg.norm)  # fmt: skip


def _fit(cfg: AccuracyConfig, model: nn.Module, batches: Any, dec: Decomposition) -> dict:
    start = time.perf_counter()
    losses = train(model, batches, cfg.steps, dec, lr=cfg.lr, weight_decay=cfg.weight_decay,
                   warmup=cfg.warmup_steps)  # fmt: skip
    seconds = time.perf_counter() - start
    # The curve as at most 50 means of equal windows keeps the JSON short.
    window = max(1, len(losses) // 50)
    curve = [float(np.mean(losses[i : i + window])) for i in range(0, len(losses), window)]
    return {"train_s": seconds, "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
            "loss_window": window, "loss_curve": curve}  # fmt: skip


def _score(test: _Data, predict: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    per_image = []
    for image, label in zip(test.images, test.labels):
        logits = predict(torch.from_numpy(image[None]))
        per_image.append(dice_per_class(logits.argmax(1)[0].numpy(), label, CLASSES))
    with np.errstate(all="ignore"):
        return [float(v) for v in np.nanmean(np.array(per_image), axis=0)]


def _patch_arm(cfg: AccuracyConfig, arm: Arm, seed: int, data: _Data, test: _Data) -> dict:
    model = _model(cfg, seed)
    sampler = PatchSampler(data.labels, CLASSES, np.random.default_rng([seed, 1]))
    starts = np.cumsum([0] + [s.steps for s in arm.stages])

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        stage = arm.stages[int(np.searchsorted(starts, step, side="right")) - 1]
        patches = sampler.sample(stage.side, stage.batch)
        cuts = [tuple(slice(lo, hi) for lo, hi in p.box) for p in patches]
        images = np.stack([data.images[p.image][(slice(None), *c)] for p, c in zip(patches, cuts)])
        labels = np.stack([data.labels[p.image][c] for p, c in zip(patches, cuts)])
        return torch.from_numpy(images), torch.from_numpy(labels)

    result = _fit(cfg, model, batches, Decomposition((1,) * cfg.spatial_dims))
    model.eval()
    last = arm.stages[-1]
    if arm.kind == "patch":
        result["dice"] = _score(test, lambda x: predict_windows(model, x, last.side, last.batch))
    else:
        result["dice"] = _score(test, _no_grad(model))
    return result


def _no_grad(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.no_grad()(model)


def _whole_arm(cfg: AccuracyConfig, seed: int, data: _Data, test: _Data, dec: Decomposition,
              model: nn.Module) -> dict:  # fmt: skip
    """Train ``model`` (converted for ``dec``, or plain for one block) on one whole image per
    step, each rank on its block, and score it on the whole test images."""
    rng = np.random.default_rng([seed, 1])

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(rng.integers(len(data.images)))
        image = torch.from_numpy(data.images[i : i + 1])
        label = torch.from_numpy(data.labels[i : i + 1])
        return dec.scatter(image), dec.scatter(label[:, None])[:, 0]

    result = _fit(cfg, model, batches, dec)
    model.eval()
    result["dice"] = _score(test, lambda x: dec.gather(_no_grad(model)(dec.scatter(x))))
    return result


def _whole_worker(cfg: AccuracyConfig, task: str, seed: int) -> dict:
    data = _load(task, cfg, seed, cfg.train_images)
    test = _load(task, cfg, TEST_SEED, cfg.test_images)
    dec = Decomposition(cfg.grid)
    model = _model(cfg, seed)
    if dec.size > 1:
        model = spatial_parallel(model, dec)
    return _whole_arm(cfg, seed, data, test, dec, model)


def run_whole(cfg: AccuracyConfig, task: str, seed: int) -> dict[str, Any]:
    """The whole-image arm of ``task`` and ``seed``: over ``cfg.grid`` on as many fresh gloo
    processes of one thread each, or in this process for a 1x1 grid (the same computation, up
    to the order of floating-point sums)."""
    world = math.prod(cfg.grid)
    if world == 1:
        return _whole_worker(cfg, task, seed)
    # Rank 0's numbers: the weights, and so the predictions, are the same on every rank.
    return run_distributed(_whole_worker, world, cfg, task, seed, timeout=4 * 3600,
                           threads=1)[0]  # fmt: skip


def run_study(cfg: AccuracyConfig, *, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train and score every arm of every task and seed; one record per (task, seed, arm)."""
    study = arms(cfg)
    total, records = len(cfg.tasks) * cfg.seeds * len(study), []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    try:
        for task in cfg.tasks:
            test = _load(task, cfg, TEST_SEED, cfg.test_images)
            for seed in range(cfg.seeds):
                data = _load(task, cfg, seed, cfg.train_images)
                for arm in study:
                    log.info("task %s, seed %d: training %s", task, seed, arm.name)
                    if arm.kind == "whole":
                        result = run_whole(cfg, task, seed)
                    else:
                        result = _patch_arm(cfg, arm, seed, data, test)
                    records.append({"task": task, "seed": seed, "arm": arm.name,
                                    "kind": arm.kind, **result})  # fmt: skip
                    if progress is not None:
                        progress(len(records), total, records[-1])
    finally:
        torch.set_num_threads(threads)
    return records


def config_dict(cfg: AccuracyConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready values, with the derived patch sides and grid."""
    return {**dataclasses.asdict(cfg), "patch_sides": list(cfg.patch_sides),
            "whole_grid": list(cfg.grid)}  # fmt: skip
