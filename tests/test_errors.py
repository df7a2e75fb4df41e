"""Bad input gets one clear error naming the value, what was expected and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import haloseg
from haloseg.cli.main import main
from haloseg.errors import DecompositionError, HalosegError, UnsupportedLayerError
from haloseg.models import UNet
from haloseg.parallel.spawn import run_distributed


def small_unet() -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=2)


def test_grid_needs_processes_without_distributed() -> None:
    with pytest.raises(DecompositionError, match=r"needs 4 processes.*torchrun"):
        haloseg.Decomposition((2, 2))


def test_image_not_aligned_names_nearest_sizes() -> None:
    net = haloseg.spatial_parallel(small_unet(), haloseg.Decomposition((1, 1)))
    with pytest.raises(DecompositionError, match=r"size 30 .* factor 4; use 28 or 32"):
        net(torch.randn(1, 1, 30, 32))


def test_converting_twice_is_refused() -> None:
    net = haloseg.spatial_parallel(small_unet(), haloseg.Decomposition((1, 1)))
    with pytest.raises(haloseg.ConfigError, match="already converted"):
        haloseg.spatial_parallel(net, haloseg.Decomposition((1, 1)))


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1\.0': Linear is not a layer"):
        haloseg.spatial_parallel(model, haloseg.Decomposition((1, 1)))


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode="bicubic")


class _Reduces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * y.mean((2, 3), keepdim=True)


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (nn.Sequential(_Functional()), r"'0': interpolate: mode='bicubic' is not supported"),
        (nn.Sequential(nn.Conv2d(1, 1, 1), _Reduces()), r"'1': .*mean changes the spatial shape"),
        (nn.Sequential(nn.Softmax(dim=2)), r"layer '0': dim=2 reaches across the image"),
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), r"return_indices=True"),
        (nn.Sequential(nn.AdaptiveAvgPool2d(4)), r"output_size=4 is not supported"),
    ],
    ids=["interpolate", "spatial-mean", "softmax", "pool-indices", "adaptive"],
)
def test_unpartitionable_calls_are_refused(model: nn.Module, pattern: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=pattern):
        net = haloseg.spatial_parallel(model, haloseg.Decomposition((1, 1)))
        net(torch.randn(1, 1, 8, 8))


def _grid_size_mismatch() -> None:
    haloseg.Decomposition((3, 1))


def _too_small() -> None:
    dec = haloseg.Decomposition((1, 2))
    haloseg.spatial_parallel(small_unet(), dec)
    dec.scatter(torch.randn(1, 1, 8, 4))


def _thin_block() -> None:
    dec = haloseg.Decomposition((1, 3))
    net = haloseg.spatial_parallel(nn.Sequential(nn.Conv2d(1, 1, 7, padding=3)), dec)
    net(dec.scatter(torch.randn(1, 1, 6, 6)))


@pytest.mark.parametrize(
    ("fn", "world", "pattern"),
    [
        (_grid_size_mismatch, 2, r"grid \(3, 1\) has 3 blocks but the process group has 2"),
        (_too_small, 2, r"size 4 is smaller than 2 blocks x alignment 4 = 8"),
        (_thin_block, 3, r"layer '0' \(Conv2d\).*thinner than the layer's halo.*coarser grid"),
    ],
    ids=["grid-size", "too-small", "thin-block"],
)
def test_distributed_errors(fn: object, world: int, pattern: str) -> None:
    # A rank's bad-input error comes back as itself: one line, not a traceback.
    with pytest.raises(HalosegError, match=pattern):
        run_distributed(fn, world, timeout=120)


def test_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "spatial", "--scenario", "4d-9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scenario '4d-9' is not one of" in err[0]
