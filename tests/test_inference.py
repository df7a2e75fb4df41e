"""Tiled inference = whole-image inference; the receptive field it derives is the true one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from haloseg.errors import UnsupportedLayerError
from haloseg.inference import plan_tiles, predict_tiled, predict_whole, receptive_field
from haloseg.models import UNet


def _unet(dims: int, depth: int, upsampling: str, seed: int, norm: str = "batch") -> UNet:
    torch.manual_seed(seed)
    model = UNet(spatial_dims=dims, in_channels=2, out_channels=3, depth=depth,
                 base_channels=4, norm=norm, upsampling=upsampling)  # fmt: skip
    for m in model.modules():  # running statistics far from 0/1, so eval-mode BN matters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, *shape)).astype(np.float32)


def _assert_tiled_equals_whole(model, image, tile, labels=True, **kwargs) -> None:
    rf = receptive_field(model, image.ndim - 1)
    whole = predict_whole(model, torch.from_numpy(image)[None], rf.alignment)[0].numpy()
    got = predict_tiled(model, image, tile, output="logits", rf=rf, **kwargs)
    assert got.shape == whole.shape
    err = np.abs(got - whole).max() / np.abs(whole).max()
    assert err < 1e-5, err
    if labels:
        got = predict_tiled(model, image, tile, rf=rf, **kwargs)
        assert got.dtype == np.uint8
        # Arg-max ties aside (none at this precision), labels are the whole image's.
        assert (got == whole.argmax(0)).mean() > 0.9999


CASES_2D = [
    (2, "transposed", (1000, 777), (256, 200)),
    (3, "linear", (1000, 777), (300, 300)),
    (4, "nearest", (1000, 777), (384, 256)),
    (4, "transposed", (333, 517), (128, 128)),
]


@pytest.mark.parametrize("depth,upsampling,shape,tile", CASES_2D, ids=lambda v: str(v))
def test_tiled_equals_whole_image_2d(depth, upsampling, shape, tile):
    model = _unet(2, depth, upsampling, seed=depth)
    _assert_tiled_equals_whole(model, _image(shape), tile, batch_size=2)


CASES_3D = [
    (2, "transposed", (77, 130, 101), (40, 72, 56)),
    (3, "linear", (77, 130, 101), (40, 72, 56)),
    (4, "nearest", (77, 130, 101), (48, 80, 64)),
]


@pytest.mark.parametrize("depth,upsampling,shape,tile", CASES_3D, ids=lambda v: str(v))
def test_tiled_equals_whole_image_3d(depth, upsampling, shape, tile):
    model = _unet(3, depth, upsampling, seed=10 + depth)
    _assert_tiled_equals_whole(model, _image(shape, 1), tile, labels=False)


def test_image_smaller_than_one_tile_and_unaligned_tile_size(caplog):
    model = _unet(2, 3, "transposed", seed=3)
    with caplog.at_level(logging.WARNING, logger="haloseg.inference.tiles"):
        _assert_tiled_equals_whole(model, _image((37, 21)), (100, 90))
    assert "rounded to (104, 96)" in caplog.text


def test_tiles_cover_every_border_once():
    rf = receptive_field(_unet(2, 2, "transposed", seed=0), 2)
    tiles = plan_tiles((50, 31), (8, 8), rf)
    cover = np.zeros((50, 31), int)
    for t in tiles:
        cover[tuple(slice(a, b) for a, b in t.core)] += 1
        for (r0, r1), (c0, _), n in zip(t.read, t.core, (52, 32)):
            assert r0 % rf.alignment == 0 and (r1 % rf.alignment == 0 or r1 == n)
            assert r0 == 0 or c0 - r0 >= rf.halo[0]
    assert (cover == 1).all()
    assert len(tiles) == 7 * 4


def test_receptive_field_is_the_empirical_dependency():
    for dims, depth, up in ((2, 2, "linear"), (2, 3, "transposed"), (3, 2, "nearest")):
        model = _unet(dims, depth, up, seed=depth).double()
        for m in list(model.modules()):  # no dead ReLUs: every path shows
            for child_name, child in list(m.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(m, child_name, nn.LeakyReLU(0.2))
        rf = receptive_field(model, dims)
        size = 4 * rf.halo[0]
        x = torch.randn(1, 2, *([size] * dims), dtype=torch.float64, requires_grad=True)
        y = model(x)
        for offset in range(rf.alignment):
            point = [size // 2 + offset] * dims
            (g,) = torch.autograd.grad(y[(0, 0, *point)], x, retain_graph=True)
            reach = g.abs().sum(1)[0].nonzero()
            for d in range(dims):
                lo, hi = reach[:, d].min().item(), reach[:, d].max().item()
                assert point[d] - lo <= rf.radius[d][0] and hi - point[d] <= rf.radius[d][1]
        assert rf.alignment == 2**depth


def test_receptive_field_of_a_known_unet():
    # 3x3 convolutions, two per level, max-pool, depth 4, transposed up-sampling.
    rf = receptive_field(_unet(2, 4, "transposed", seed=0), 2)
    assert rf.radius == ((107, 107), (107, 107)) and rf.alignment == 16 and rf.halo == (112, 112)


class _Rolling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.conv(x), 1, dims=2)


@pytest.mark.parametrize(
    "model,reason",
    [
        (lambda: _unet(2, 2, "transposed", 0, norm="group"), "GroupNorm"),
        (lambda: _unet(2, 2, "transposed", 0, norm="instance"), "InstanceNorm"),
        (lambda: _unet(2, 2, "transposed", 0).train(), "training mode"),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
            "whole image",
        ),
        (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")), "circular"),
        (_Rolling, "roll wraps around"),
    ],
    ids=["group", "instance", "bn-train", "global-pool", "circular", "functional"],
)
def test_non_local_layers_are_refused(model, reason):
    with pytest.raises(UnsupportedLayerError, match=reason):
        receptive_field(model(), 2)
