"""The geometry registry: refusals by path, functional calls partitioned, pad modules, even
kernels, registered subclasses, and the networks users bring (MONAI FlexibleUNet and
HighResNet; segmentation_models_pytorch in its own venv) against one process."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import haloseg
from _equivalence import Case
from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import registered_layers
from test_spatial_equivalence import LAYERS, run


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (timm's ResNetV2/BiT encoders)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@haloseg.register_layer
class RegisteredStdConv2d(StdConv2d):
    pass


def std_conv_net(cls: type[nn.Conv2d]) -> nn.Module:
    return nn.Sequential(
        cls(2, 4, 3, padding=1), nn.ReLU(), cls(4, 3, 3, stride=2, padding=1), nn.GroupNorm(1, 3)
    )


class Functional(nn.Module):
    """Spatial functional calls inside a forward, as smp's decoder and MONAI's blocks make."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.a(x)
        y = F.max_pool2d(skip, 2)
        y = self.b(F.pad(y, [1, 1, 1, 1], mode="reflect"))
        y = F.avg_pool2d(F.pad(y, [1, 0, 1, 0], value=0.5), 2, stride=1)
        y = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        z = F.interpolate(F.avg_pool2d(skip, 2), size=skip.shape[2:], mode="nearest")
        w = F.interpolate(z, scale_factor=1, mode="bilinear", align_corners=True)
        return self.c(torch.cat([y, w], dim=1))


def pad_then_conv() -> nn.Module:
    return nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(2, 4, 3),
        nn.ConstantPad2d((0, 1, 0, 1), 0.0), nn.Conv2d(4, 4, 3, stride=2),  # TF-style same
        nn.ReplicationPad2d((2, 1, 0, 3)), nn.ZeroPad2d(1), nn.Conv2d(4, 3, 3),
        nn.CircularPad2d((1, 2, 0, 1)), nn.Conv2d(3, 3, 3, padding=1),
    )  # fmt: skip


EVEN = [(k, p) for k in (2, 4) for p in range(k + 1)]


def even_conv(kernel: tuple[int, int], padding: tuple[int, int]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, kernel, padding=padding))


def flexible_unet() -> nn.Module:
    from monai.networks import nets

    net = nets.FlexibleUNet(in_channels=2, out_channels=3, backbone="efficientnet-b0",
                            pretrained=False, decoder_channels=(16, 8, 8, 4, 4))  # fmt: skip
    # Stochastic depth draws one number per sample: not a spatial operation, but a random
    # stream one process and four cannot share.
    for m in net.modules():
        if hasattr(m, "drop_connect_rate"):
            m.drop_connect_rate = 0.0
    return net


def high_res_net() -> nn.Module:
    from monai.networks import nets

    return nets.HighResNet(spatial_dims=2, in_channels=2, out_channels=3,
                           layer_params=({"name": "conv_0", "n_features": 4, "kernel_size": 3},
                                         {"name": "res_1", "n_features": 4, "kernels": (3, 3),
                                          "repeat": 1},
                                         {"name": "res_2", "n_features": 8, "kernels": (3, 3),
                                          "repeat": 1},
                                         {"name": "res_3", "n_features": 12, "kernels": (3, 3),
                                          "repeat": 1},
                                         {"name": "conv_1", "n_features": 8, "kernel_size": 1},
                                         {"name": "conv_2", "kernel_size": 1}))  # fmt: skip


def smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3,
                    decoder_channels=(16, 8, 4), in_channels=2, classes=3)  # fmt: skip


# ---------------------------------------------------------------- refusals (one process)


def test_subclass_with_its_own_forward_is_refused_by_path() -> None:
    net = std_conv_net(StdConv2d)
    with pytest.raises(UnsupportedLayerError, match=r"layer '0': StdConv2d overrides Conv2d"):
        haloseg.spatial_parallel(net, haloseg.Decomposition((1, 1)))
    with pytest.raises(UnsupportedLayerError, match=r"'0': StdConv2d overrides"):
        haloseg.receptive_field(std_conv_net(StdConv2d), 2)


def test_a_subclass_that_keeps_the_forward_needs_no_registration() -> None:
    class Named(nn.Conv2d):
        pass

    rf = haloseg.receptive_field(nn.Sequential(Named(2, 3, 5, padding=2)), 2)
    assert rf.radius == ((2, 2), (2, 2))


def test_calls_whose_geometry_cannot_be_known_are_refused_by_name() -> None:
    class Rolls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(self.conv(x), 1, dims=2)

    net = haloseg.spatial_parallel(Rolls(), haloseg.Decomposition((1, 1)))
    with pytest.raises(UnsupportedLayerError, match=r"'<root>': torch.roll wraps"):
        net(torch.randn(1, 2, 8, 8))


def test_every_registered_execution_has_an_equivalence_case() -> None:
    """Adding a layer type means adding a case to LAYERS (or a network test here)."""
    covered = {type(m).__name__ for build in LAYERS.values() for m in build().modules()}
    covered |= {type(m).__name__ for m in pad_then_conv().modules()}
    covered |= {"Crop"}  # every haloseg U-Net with valid padding (test_spatial_equivalence)
    from haloseg.geometry.registry import _LAYERS

    executions = {n.split(".")[-1] for n, e in _LAYERS.items() if e.execution is not None}
    missing = sorted(n for n in executions if n not in covered and not n.endswith(("1d", "3d")))
    assert not missing, f"registered executions without an equivalence case: {missing}"
    assert "ConstantPad2d" in registered_layers()


# ------------------------------------------------------------- equivalence (processes)


def test_functional_calls_pad_modules_and_registered_subclass() -> None:
    cases = [
        Case("functional", Functional, (24, 40), (2, 2)),
        Case("pad-modules", pad_then_conv, (26, 38), (2, 2)),
        Case("std-conv-registered", functools.partial(std_conv_net, RegisteredStdConv2d),
             (24, 36), (2, 2)),
        Case("functional-fp32", Functional, (24, 40), (2, 2), dtype=torch.float32),
    ] + [
        Case(f"even-k{k}-p{p}", functools.partial(even_conv, (k, k), (p, p)), (22, 30), (2, 2))
        for k, p in EVEN
    ] + [
        Case("even-k2x3-p1", functools.partial(even_conv, (2, 3), (1, 1)), (22, 30), (2, 2)),
    ]  # fmt: skip
    run(cases, 4)


def test_monai_flexible_unet_and_high_res_net() -> None:
    pytest.importorskip("monai")
    cases = [
        Case("FlexibleUNet-efficientnet-b0", flexible_unet, (64, 96), (2, 2), steps=1),
        Case("HighResNet", high_res_net, (24, 36), (2, 2)),
        Case("HighResNet-4x1", high_res_net, (50, 20), (4, 1), uneven=False),  # 13, 13, 12, 12
    ]
    run(cases, 4)


@pytest.mark.smp
def test_smp_unet_resnet18() -> None:
    pytest.importorskip("segmentation_models_pytorch")
    run([Case("smp-Unet-resnet18", smp_unet, (48, 64), (2, 2), steps=1)], 4)
    run([Case("smp-Unet-resnet18-1x2", smp_unet, (32, 64), (1, 2), steps=1)], 2)


@pytest.mark.smp
def test_receptive_field_of_smp_unet_is_its_dependency_window() -> None:
    pytest.importorskip("segmentation_models_pytorch")
    net = smp_unet().double().eval()
    for m in list(net.modules()):  # no dead ReLUs: every path shows
        for name, child in list(m.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(m, name, nn.LeakyReLU(0.2))
    rf = haloseg.receptive_field(net, 2)
    assert rf.alignment == 8
    assert rf.radius == measured_radius(net, 2, rf)


def measured_radius(net: nn.Module, dims: int, rf: haloseg.ReceptiveField) -> tuple:
    """Per axis, the farthest input voxel autograd finds an output voxel depending on, over
    one alignment period of output positions."""
    size = 4 * max(rf.halo) // rf.alignment * rf.alignment
    x = torch.randn(1, 2, *([size] * dims), dtype=torch.float64, requires_grad=True)
    y = net(x)
    radius = [[0, 0] for _ in range(dims)]
    for offset in range(rf.alignment):
        point = [size // 2 + offset] * dims
        (g,) = torch.autograd.grad(y[(0, 0, *point)], x, retain_graph=True)
        reach = g.abs().sum(1)[0].nonzero()
        for d in range(dims):
            radius[d][0] = max(radius[d][0], point[d] - reach[:, d].min().item())
            radius[d][1] = max(radius[d][1], reach[:, d].max().item() - point[d])
    return tuple(tuple(r) for r in radius)


def test_receptive_field_of_a_registered_weight_standardised_convolution() -> None:
    """Operations on the kernel are not image operations: the field is the convolutions'."""
    net = nn.Sequential(RegisteredStdConv2d(2, 4, 3, padding=1), nn.ReLU(),
                        RegisteredStdConv2d(4, 3, 5, padding=2))  # fmt: skip
    assert haloseg.receptive_field(net, 2).radius == ((3, 3), (3, 3))


def test_receptive_field_refuses_flattening_the_image() -> None:
    class Flattens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.flatten(2).softmax(-1).view_as(y)

    with pytest.raises(UnsupportedLayerError, match="flatten turns the image"):
        haloseg.receptive_field(Flattens(), 2)
