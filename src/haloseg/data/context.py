"""Synthetic tasks whose labels need context beyond a training patch, and a local control.

For the accuracy study of whole-image training. With ``S`` the shortest side, objects have
intensity 1 on background 0, plus Gaussian noise:

- ``size``: axis-aligned squares (2-D) or cubes (3-D). One large one (side 0.52..0.6 S, wider
  than an S/2 patch) is class 2, the small ones (side S/4..S/3.2, at least an S/4 patch) are
  class 1. Interiors, edges and corners look the same in both: only a view of the whole
  object tells its class.
- ``marker``: discs or balls of radius S/12, all of one class set by a frame S/32 thick along
  every image border: bright (intensity 2) for class 2, dark (-1) for class 1. The frame is
  background and the objects keep S/16 away from it.
- ``control``: discs or balls of radius S/12, class 1 smooth, class 2 striped (a sinusoid of
  period 4..6 voxels and amplitude 1 along a random direction) at the same mean intensity: a
  small patch suffices.

As in :mod:`haloseg.data.synthetic`, every voxel is a pure function of the seed, the sample
index and its global coordinates, so ``read(index, box)`` is bit-identical to that box of the
whole image, at any size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from haloseg.data._blocks import check_index
from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.data.synthetic import _normal_noise
from haloseg.errors import ConfigError

__all__ = ["CONTEXT_MIN_SIDE", "CONTEXT_TASKS", "ContextDataset"]

CONTEXT_TASKS = ("size", "marker", "control")
CONTEXT_MIN_SIDE = 32
"""Shortest image side the tasks allow (the frame is S/32 voxels thick at the least)."""
_OBJECTS = {"size": (3, 5), "marker": (3, 6), "control": (4, 8)}
"""Objects per image (min, max) by default; for ``size`` one of them is the large one (the
small ones that find no room are left out)."""
_SMALL, _LARGE, _MEDIUM = (1 / 8, 1 / 6.4), (0.26, 0.3), 1 / 12
"""Half-sides (``size``) and radii as fractions of the shortest side."""
_FRAME_LEVEL, _FRAME_WIDTH = {1: -1.0, 2: 2.0}, 1 / 32
_STRIPE_AMPLITUDE, _STRIPE_PERIOD = 1.0, (4.0, 6.0)
_TRIES = 200


class _Ball(NamedTuple):
    centre: np.ndarray
    radius: float
    """Radius of a ball, half the side of a cube."""
    cls: int
    cube: bool = False
    wave: np.ndarray | None = None
    """Wave vector of the stripes (radians per voxel), None for a smooth object."""
    phase: float = 0.0


class ContextDataset:
    """``num_images`` images of ``shape`` for one of :data:`CONTEXT_TASKS`: 1 channel, classes
    0 (background), 1 and 2; ``objects`` = (min, max) objects per image, ``noise`` = standard
    deviation of the Gaussian noise on every voxel."""

    in_channels = 1
    num_classes = 3

    def __init__(
        self,
        task: str,
        shape: Sequence[int],
        num_images: int,
        *,
        seed: int = 0,
        noise: float = 0.3,
        objects: tuple[int, int] | None = None,
    ) -> None:
        if task not in CONTEXT_TASKS:
            raise ConfigError(f"context task {task!r} is not one of {', '.join(CONTEXT_TASKS)}")
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or min(self.shape) < CONTEXT_MIN_SIDE:
            raise ConfigError(
                f"context task shape {tuple(shape)} must be 2-D or 3-D, "
                f"each side >= {CONTEXT_MIN_SIDE}"
            )
        if num_images < 1 or seed < 0 or not (math.isfinite(noise) and noise >= 0):
            raise ConfigError(
                f"context tasks need num_images >= 1, seed >= 0 and finite noise >= 0; got "
                f"num_images={num_images}, seed={seed}, noise={noise}"
            )
        objects = _OBJECTS[task] if objects is None else tuple(objects)
        if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
            raise ConfigError(
                f"objects={objects} must be (min, max) objects per image, 1 <= min <= max"
            )
        self.task, self.num_images, self.seed, self.noise = task, num_images, seed, noise
        self.objects = (int(objects[0]), int(objects[1]))
        self.spatial_dims = len(self.shape)

    def __len__(self) -> int:
        return self.num_images

    def info(self, index: int) -> SampleInfo:
        return SampleInfo(name=f"{self.task}[{index}]", shape=self.shape)

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``(image (1, *box) float32, label (*box) int64)`` of sample ``index``."""
        level, label = self._render(index, box)
        key = (self.seed * 1_000_003 + index) % 2**40
        image = level + self.noise * _normal_noise(box, self.shape, key)
        return image[None].astype(np.float32), label

    def label(self, index: int, box: Box) -> np.ndarray:
        """Class map of ``box`` of sample ``index``."""
        return self._render(index, box)[1]

    def _render(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """(noise-free intensity, label) of ``box`` of sample ``index``."""
        check_index(index, self.num_images, f"{self.task} task")
        check_box(box, self.shape, self.info(index).name)
        balls, frame = self._layout(index)
        level = np.zeros([hi - lo for lo, hi in box], dtype=np.float64)
        label = np.zeros(level.shape, dtype=np.int64)
        if frame is not None:
            level[_frame_mask(box, self.shape)] = _FRAME_LEVEL[frame]
        for ball in balls:
            window = _ball_window(ball, box)
            if window is None:
                continue
            points = _voxel_centres(window, box)
            if ball.cube:
                inside = functools.reduce(
                    np.logical_and, [abs(p - c) <= ball.radius for p, c in zip(points, ball.centre)]
                )
            else:
                inside = sum((p - c) ** 2 for p, c in zip(points, ball.centre)) <= ball.radius**2
            label[window][inside] = ball.cls
            level[window][inside] = _ball_level(ball, points, inside.shape)[inside]
        return level, label

    def _layout(self, index: int) -> tuple[list[_Ball], int | None]:
        """The objects of sample ``index`` and, for ``marker``, the class the frame sets."""
        rng = np.random.default_rng([self.seed, index, 1 + CONTEXT_TASKS.index(self.task)])
        side = min(self.shape)
        count = int(rng.integers(self.objects[0], self.objects[1] + 1))
        low, high = np.ones(self.spatial_dims), np.array(self.shape, dtype=np.float64) - 1
        gap, frame, cube = max(2.0, side / 32), None, self.task == "size"
        if cube:
            radii = [rng.uniform(*_LARGE) * side] + [
                rng.uniform(*_SMALL) * side for _ in range(count - 1)
            ]
            classes = [2] + [1] * (count - 1)
        else:
            radii, classes = [_MEDIUM * side] * count, [int(c) for c in rng.integers(1, 3, count)]
        if self.task == "marker":
            frame = int(rng.integers(1, 3))
            classes = [frame] * count
            keep = _frame_width(self.shape) + side / 16
            low, high = low + keep, high - keep
        balls: list[_Ball] = []
        for radius, cls in zip(radii, classes, strict=True):
            if cube and not balls:  # the large one near a corner, leaving room for the rest
                corner = rng.integers(2, size=self.spatial_dims) * 0.9
                reach = high - low - 2 * radius
                centre = low + radius + reach * (corner + rng.uniform(0, 0.1, self.spatial_dims))
            else:
                centre = _free_centre(rng, radius, low, high, balls, gap, cube)
            if centre is None:
                continue
            if cls == 2 and self.task == "control":
                direction = rng.normal(size=self.spatial_dims)
                period = rng.uniform(*_STRIPE_PERIOD)
                wave = 2 * math.pi * direction / np.linalg.norm(direction) / period
                phase = rng.uniform(0, 2 * math.pi)
                balls.append(_Ball(centre, radius, cls, wave=wave, phase=phase))
            else:
                balls.append(_Ball(centre, radius, cls, cube=cube))
        return balls, frame


def _free_centre(
    rng: np.random.Generator,
    radius: float,
    low: np.ndarray,
    high: np.ndarray,
    balls: list[_Ball],
    gap: float,
    cube: bool,
) -> np.ndarray | None:
    """A centre that keeps a ball (or cube) of ``radius`` inside ``[low, high]`` and ``gap``
    voxels from each of ``balls``; None when ``_TRIES`` draws all collide."""
    for _ in range(_TRIES):
        centre = rng.uniform(low + radius, high - radius)
        if all(_apart(centre, radius, b, gap, cube) for b in balls):
            return centre
    return None


def _apart(centre: np.ndarray, radius: float, ball: _Ball, gap: float, cube: bool) -> bool:
    """Whether an object at ``centre`` keeps ``gap`` voxels from ``ball`` (cubes: along an
    axis, balls: along the line of centres)."""
    reach = radius + ball.radius + gap
    if cube:
        return bool((abs(centre - ball.centre) >= reach).any())
    return bool(np.linalg.norm(centre - ball.centre) >= reach)


def _ball_window(ball: _Ball, box: Box) -> tuple[slice, ...] | None:
    """Slices of ``box`` (local indices) holding every voxel ``ball`` may cover; None if none.
    Keeps the work per block proportional to the objects it meets, at any image size."""
    window = []
    for (lo, hi), c in zip(box, ball.centre, strict=True):
        start, stop = max(lo, math.floor(c - ball.radius)), min(hi, math.ceil(c + ball.radius))
        if start >= stop:
            return None
        window.append(slice(start - lo, stop - lo))
    return tuple(window)


def _voxel_centres(window: tuple[slice, ...], box: Box) -> list[np.ndarray]:
    """Global coordinates of the voxel centres of ``window`` of ``box``, as an open grid."""
    dims = len(box)
    return [
        (np.arange(s.start, s.stop) + lo + 0.5).reshape([-1 if e == d else 1 for e in range(dims)])
        for d, (s, (lo, _)) in enumerate(zip(window, box, strict=True))
    ]


def _ball_level(ball: _Ball, points: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Noise-free intensity of ``ball`` at ``points`` (open grid of voxel centres)."""
    if ball.wave is None:
        return np.ones(shape)
    angle = sum(p * k for p, k in zip(points, ball.wave)) + ball.phase
    return np.broadcast_to(1.0 + _STRIPE_AMPLITUDE * np.sin(angle), shape)


def _frame_width(shape: tuple[int, ...]) -> int:
    return max(1, round(min(shape) * _FRAME_WIDTH))


def _frame_mask(box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels of ``box`` within the frame: ``_frame_width`` of any image border."""
    width, dims = _frame_width(shape), len(shape)
    near = [
        ((np.arange(lo, hi) < width) | (np.arange(lo, hi) >= n - width)).reshape(
            [-1 if e == d else 1 for e in range(dims)]
        )
        for d, ((lo, hi), n) in enumerate(zip(box, shape, strict=True))
    ]
    return np.broadcast_to(functools.reduce(np.logical_or, near), [hi - lo for lo, hi in box])
