"""Tests of the plain U-Net: shapes, valid-padding geometry, presets, layer count, errors."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch import nn

from haloseg.errors import ConfigError
from haloseg.models import PRESETS, Crop, UNet, count_layers, unet_preset
from haloseg.models.unet import NORMS, UPSAMPLINGS


def _small_unet(spatial_dims: int = 2, **overrides: object) -> UNet:
    kwargs = dict(
        spatial_dims=spatial_dims, in_channels=2, out_channels=3, depth=2, base_channels=4
    )
    return UNet(**{**kwargs, **overrides})


def _smallest_valid_size(model: UNet, start: int = 1) -> int:
    for size in itertools.count(start):
        try:
            model.output_size(size)
        except ConfigError:
            continue
        return size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("upsampling", UPSAMPLINGS)
@pytest.mark.parametrize("norm", NORMS)
def test_forward_shape_2d(norm: str, upsampling: str, padding: str) -> None:
    torch.manual_seed(0)
    model = _small_unet(norm=norm, upsampling=upsampling, padding=padding)
    size = 32 if padding == "same" else _smallest_valid_size(model)
    out = model(torch.randn(2, 2, size, size))
    expected = model.output_size(size)
    assert out.shape == (2, 3, expected, expected)
    if padding == "same":
        assert expected == size
    else:
        assert expected < size


@pytest.mark.parametrize(
    ("norm", "upsampling", "padding"),
    [
        ("batch", "transposed", "same"),
        ("instance", "linear", "same"),
        ("group", "nearest", "valid"),
    ],
)
def test_forward_shape_3d(norm: str, upsampling: str, padding: str) -> None:
    model = _small_unet(3, norm=norm, upsampling=upsampling, padding=padding, base_channels=2)
    size = 16 if padding == "same" else _smallest_valid_size(model)
    out = model(torch.randn(1, 2, size, size, size))
    expected = model.output_size(size)
    assert out.shape == (1, 3, expected, expected, expected)


def test_valid_padding_matches_classic_unet() -> None:
    # Ronneberger et al.: 572 -> 388 with depth 4 and two unpadded convs per level.
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=4, padding="valid")
    assert model.output_size(572) == 388
    assert [crop.margins for crop in model.crops] == [(4, 4), (16, 16), (40, 40), (88, 88)]


@pytest.mark.parametrize("convs_per_level", [1, 2, 3])
def test_output_size_matches_forward_for_valid_padding(convs_per_level: int) -> None:
    model = _small_unet(padding="valid", convs_per_level=convs_per_level, base_channels=2)
    first = _smallest_valid_size(model)
    for size in (first, first + model.downsampling_factor):
        out = model(torch.randn(1, 2, size, size + model.downsampling_factor))
        assert out.shape[2:] == (
            model.output_size(size),
            model.output_size(size + model.downsampling_factor),
        )


def test_output_size_rejects_sizes_that_do_not_fit() -> None:
    model = _small_unet()
    assert model.downsampling_factor == 4
    assert model.output_size(32) == 32
    with pytest.raises(ConfigError, match="input size 30 .* use 28 or 32"):
        model.output_size(30)


def test_backward_reaches_every_parameter() -> None:
    model = _small_unet(norm="group", padding="valid", upsampling="linear")
    size = _smallest_valid_size(model)
    x = torch.randn(1, 2, size, size, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_group_norm_groups_divide_channels() -> None:
    model = _small_unet(norm="group", base_channels=12, norm_groups=8)
    groups = {
        (m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, nn.GroupNorm)
    }
    assert groups == {(6, 12), (8, 24), (8, 48)}


def test_conv_bias_only_without_norm() -> None:
    for norm, has_bias in (("batch", False), ("none", True)):
        model = _small_unet(norm=norm)
        convs = [block[0] for block in model.encoder]
        assert all((conv.bias is not None) == has_bias for conv in convs)


def test_channels_follow_multiplier() -> None:
    model = _small_unet(base_channels=5, channel_multiplier=1.5)
    assert model.channels == (5, 8, 11)


def test_crop_removes_margins_from_both_ends() -> None:
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).reshape(2, 3, 6, 7)
    torch.testing.assert_close(Crop((1, 2))(x), x[:, :, 1:5, 2:5])
    torch.testing.assert_close(Crop((0, 0))(x), x)


def test_forward_uses_no_functional_spatial_ops() -> None:
    source = inspect.getsource(UNet.forward)
    for banned in ("F.", "functional", "interpolate", "pad(", "[:,"):
        assert banned not in source


def test_count_layers_counts_leaf_modules() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()))
    assert count_layers(model) == 3
    # Two (conv, norm, relu) per block: 3 encoder + 2 decoder blocks, 2 pools, 2 ups, 1 head.
    assert count_layers(_small_unet()) == 5 * 6 + 2 + 2 + 1
    assert count_layers(_small_unet(padding="valid", upsampling="nearest")) == 5 * 6 + 2 + 6 + 1


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_presets_build_and_run_on_meta(name: str, spatial_dims: int) -> None:
    # The meta device checks every shape without allocating the large presets' weights.
    with torch.device("meta"):
        model = unet_preset(name, spatial_dims=spatial_dims, in_channels=1, out_channels=2)
        size = 2 * model.downsampling_factor
        out = model(torch.empty(1, 1, *(size,) * spatial_dims))
    assert out.shape == (1, 2, *(size,) * spatial_dims)


def test_large_preset_has_summit_scale_depth() -> None:
    with torch.device("meta"):
        model = unet_preset("large", spatial_dims=3, in_channels=1, out_channels=2)
    assert count_layers(model) >= 140


def test_small_preset_forward() -> None:
    model = unet_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_preset_overrides_apply() -> None:
    model = unet_preset("small", spatial_dims=2, in_channels=1, out_channels=2, norm="group")
    assert model.norm == "group" and model.depth == PRESETS["small"]["depth"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "batchnorm"}, "norm='batchnorm' is not one of 'batch'"),
        ({"spatial_dims": 1}, "spatial_dims=1 is not one of 2, 3"),
        ({"spatial_dims": 2.0}, "spatial_dims=2.0"),
        ({"depth": 0}, "depth=0 must be an integer >= 1"),
        ({"upsampling": "bicubic"}, "upsampling='bicubic'"),
        ({"padding": "reflect"}, "padding='reflect'"),
        ({"base_channels": 0}, "base_channels=0"),
        ({"channel_multiplier": 0.0}, "channel_multiplier=0.0"),
    ],
)
def test_bad_config_raises(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _small_unet(**kwargs)


def test_unknown_preset_and_override_raise() -> None:
    with pytest.raises(ConfigError, match="preset 'huge' is not one of small, medium, large"):
        unet_preset("huge", spatial_dims=2, in_channels=1, out_channels=1)
    with pytest.raises(ConfigError, match="unknown override"):
        unet_preset("small", spatial_dims=2, in_channels=1, out_channels=1, widht=3)
