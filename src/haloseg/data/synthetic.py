"""Synthetic ellipses (2-D) and ellipsoids (3-D) of several classes on noisy backgrounds.

As in the DistDL ellipse experiments. Every voxel is a pure function of the seed, the sample
index and its global coordinates (shapes are analytic, noise is a counter-based hash), so a
rank generates exactly its own block, bit-identical to the same box of the whole image, at
any image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from haloseg.data.base import Box, SampleInfo, check_box
from haloseg.errors import ConfigError

__all__ = ["EllipseDataset"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Wrapping uint64 arithmetic is the point here; numpy wraps arrays silently.
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(keys: np.ndarray) -> np.ndarray:
    """Uniform in (0, 1] from 53 bits of the hash of each key."""
    return ((_splitmix64(keys) >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53


def _normal_noise(box: Box, shape: Sequence[int], key: int) -> np.ndarray:
    """Standard normal noise of ``box`` of a ``shape`` image (Box-Muller on hashed indices)."""
    axes = [np.arange(lo, hi, dtype=np.uint64) for lo, hi in box]
    linear = np.zeros([hi - lo for lo, hi in box], dtype=np.uint64)
    stride = 1
    for d in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[d] = -1
        linear = linear + axes[d].reshape(view) * np.uint64(stride)
        stride *= int(shape[d])
    base = np.uint64(key) * np.uint64(2 * stride)
    with np.errstate(over="ignore"):
        u1 = _uniform(base + 2 * linear)
        u2 = _uniform(base + 2 * linear + np.uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    if dims == 2:
        a = rng.uniform(0, math.pi)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(dims, dims)))
    return q * np.sign(np.diag(r))


class EllipseDataset:
    """``num_images`` images of ``shape``: ellipses of classes ``1..num_classes-1`` drawn over
    each other on background ``0``; channel ``k`` shows class ``c`` at a brightness of its
    own, plus Gaussian noise of standard deviation ``noise``."""

    def __init__(
        self,
        shape: Sequence[int],
        *,
        num_images: int = 32,
        num_classes: int = 3,
        in_channels: int = 1,
        ellipses: tuple[int, int] = (3, 8),
        noise: float = 0.4,
        seed: int = 0,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or min(self.shape) < 8:
            raise ConfigError(f"synthetic shape {shape} must be 2-D or 3-D, each side >= 8")
        if num_classes < 2 or num_images < 1 or in_channels < 1 or seed < 0:
            raise ConfigError(
                f"synthetic data needs num_classes >= 2, num_images >= 1, in_channels >= 1, "
                f"seed >= 0; got {num_classes}, {num_images}, {in_channels}, {seed}"
            )
        self.spatial_dims = len(self.shape)
        self.num_images, self.num_classes, self.in_channels = num_images, num_classes, in_channels
        self.ellipses, self.noise, self.seed = ellipses, noise, seed
        brightness = np.random.default_rng([seed, 2**31]).uniform(0.5, 1.0, (in_channels, 1))
        self._levels = brightness * np.arange(num_classes) / (num_classes - 1)

    def __len__(self) -> int:
        return self.num_images

    def info(self, index: int) -> SampleInfo:
        return SampleInfo(name=f"ellipses[{index}]", shape=self.shape)

    def _shapes(self, index: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(centre, inverse axes matrix, class) of each ellipse of sample ``index``."""
        rng = np.random.default_rng([self.seed, index])
        size = np.array(self.shape, dtype=np.float64)
        out = []
        for _ in range(int(rng.integers(self.ellipses[0], self.ellipses[1] + 1))):
            centre = rng.uniform(0.1, 0.9, self.spatial_dims) * size
            radii = rng.uniform(0.05, 0.2, self.spatial_dims) * size.min()
            inverse = np.diag(1.0 / radii) @ _rotation(rng, self.spatial_dims).T
            out.append((centre, inverse, int(rng.integers(1, self.num_classes))))
        return out

    def label(self, index: int, box: Box) -> np.ndarray:
        """Class map of ``box`` of sample ``index``: later ellipses cover earlier ones."""
        grids = np.meshgrid(
            *[np.arange(lo, hi, dtype=np.float64) + 0.5 for lo, hi in box], indexing="ij"
        )
        points = np.stack(grids, -1)
        label = np.zeros(points.shape[:-1], dtype=np.int64)
        for centre, inverse, cls in self._shapes(index):
            inside = (((points - centre) @ inverse.T) ** 2).sum(-1) <= 1.0
            label[inside] = cls
        return label

    def read(self, index: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        check_box(box, self.shape, f"ellipses[{index}]")
        label = self.label(index, box)
        image = np.empty((self.in_channels, *label.shape), dtype=np.float32)
        for k in range(self.in_channels):
            key = (self.seed * 1_000_003 + index) * self.in_channels + k
            noise = _normal_noise(box, self.shape, key % 2**40)
            image[k] = self._levels[k][label] + self.noise * noise
        return image, label
