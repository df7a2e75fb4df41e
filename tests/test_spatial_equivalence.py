"""Partitioned = single process: outputs, gradients, running statistics, optimizer step."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from _equivalence import Case, run_cases, tolerance
from haloseg.models import UNet
from haloseg.parallel.spawn import run_distributed

NORMS = ("batch", "instance", "group", "none")
UPSAMPLINGS = ("transposed", "nearest", "linear")


def unet(spatial_dims: int, norm: str, upsampling: str) -> UNet:
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=3,
        depth=2,
        base_channels=4,
        norm=norm,
        norm_groups=2,
        upsampling=upsampling,
    )


def assert_cases(results: list) -> None:
    failures = []
    for (name, errs), case_dtype in results:
        tol = tolerance(case_dtype)
        bad = {k: v for k, v in errs.items() if not v <= tol}
        if bad:
            failures.append(f"{name}: {bad} (tolerance {tol})")
        assert errs, name
    assert not failures, "\n".join(failures)


def run(cases: list[Case], world: int) -> None:
    per_rank = run_distributed(run_cases, world, cases, timeout=600)
    dtypes = [c.dtype for c in cases]
    for rank_results in per_rank:
        assert_cases(list(zip(rank_results, dtypes, strict=True)))


GRIDS_2D = {(1, 2): (24, 40), (3, 1): (36, 20), (2, 2): (28, 44)}


@pytest.mark.parametrize("grid", list(GRIDS_2D), ids=lambda g: "x".join(map(str, g)))
def test_unet_2d_every_norm_and_upsampling(grid: tuple[int, ...]) -> None:
    shape = GRIDS_2D[grid]
    cases = [
        Case(
            f"unet2d-{norm}-{up}-{dtype}",
            functools.partial(unet, 2, norm, up),
            shape,
            grid,
            dtype=dtype,
            seed=i,
        )
        for i, (norm, up) in enumerate((n, u) for n in NORMS for u in UPSAMPLINGS)
        for dtype in (torch.float64, torch.float32)
    ]
    run(cases, len(cases[0].grid) and grid[0] * grid[1])


@pytest.mark.parametrize("grid", [(2, 1, 2), (1, 2, 2)], ids=lambda g: "x".join(map(str, g)))
def test_unet_3d(grid: tuple[int, ...]) -> None:
    cases = [
        Case(
            f"unet3d-{norm}-{up}-{dtype}",
            functools.partial(unet, 3, norm, up),
            (12, 8, 16),
            grid,
            dtype=dtype,
            batch=1,
            seed=i,
        )
        for i, (norm, up) in enumerate(
            [("batch", "transposed"), ("instance", "linear"), ("group", "nearest")]
        )
        for dtype in (torch.float64, torch.float32)
    ]
    run(cases, 4)


def monai_net(name: str) -> nn.Module:
    from monai.networks import nets

    two_d = {"spatial_dims": 2, "in_channels": 2, "out_channels": 3}
    builders = {
        "BasicUNet": lambda: nets.BasicUNet(**two_d, features=(4, 4, 8, 8, 16, 4)),
        "UNet": lambda: nets.UNet(**two_d, channels=(4, 8, 16), strides=(2, 2), num_res_units=2),
        "SegResNet": lambda: nets.SegResNet(
            **two_d, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)
        ),
        "DynUNet": lambda: nets.DynUNet(
            **two_d,
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            upsample_kernel_size=[2, 2],
            filters=[4, 8, 16],
        ),  # fmt: skip
        "AttentionUnet": lambda: nets.AttentionUnet(**two_d, channels=(4, 8, 16), strides=(2, 2)),
    }
    return builders[name]()


@pytest.mark.parametrize("name", ["BasicUNet", "UNet", "SegResNet", "DynUNet", "AttentionUnet"])
def test_monai_networks(name: str) -> None:
    pytest.importorskip("monai")
    shape = (48, 32) if name == "BasicUNet" else (24, 36)
    cases = [
        Case(f"monai-{name}-{dtype}", functools.partial(monai_net, name), shape, (2, 2),
             dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    ]  # fmt: skip
    run(cases, 4)


# --- every layer rule, one layer at a time (after a 1x1 conv so weights see gradients) ---


def layer(*modules: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 1), *modules)


LAYERS = {
    "conv-k4-s1-same-even": lambda: layer(nn.Conv2d(3, 2, 4, padding="same")),
    "conv-k5-dil2": lambda: layer(nn.Conv2d(3, 2, 5, padding=4, dilation=2)),
    "conv-k3-s2-p1": lambda: layer(nn.Conv2d(3, 2, 3, stride=2, padding=1)),
    "conv-k3-s3-p2-groups": lambda: layer(nn.Conv2d(3, 3, 3, stride=3, padding=2, groups=3)),
    "conv-valid": lambda: layer(nn.Conv2d(3, 2, 3)),
    "conv-reflect": lambda: layer(nn.Conv2d(3, 2, 3, padding=2, padding_mode="reflect")),
    "conv-replicate": lambda: layer(nn.Conv2d(3, 2, 5, padding=2, padding_mode="replicate")),
    "conv-circular": lambda: layer(nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular")),
    "tconv-k2-s2": lambda: layer(nn.ConvTranspose2d(3, 2, 2, stride=2)),
    "tconv-k3-s2-p1-op1": lambda: layer(
        nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
    ),
    "tconv-k4-s3-p2-op1-d2": lambda: layer(
        nn.ConvTranspose2d(3, 2, 4, stride=3, padding=2, output_padding=1, dilation=2)
    ),
    "tconv-k3-s1": lambda: layer(nn.ConvTranspose2d(3, 2, 3)),
    "maxpool-k3-s2-p1-ceil": lambda: layer(nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
    "maxpool-k2-dil2": lambda: layer(nn.MaxPool2d(2, 1, dilation=2)),
    "avgpool-k3-s2-p1-ceil-exclude": lambda: layer(
        nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    ),
    "avgpool-k3-s2-p1-ceil-include": lambda: layer(nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
    "avgpool-k3-s1-p1-divisor": lambda: layer(nn.AvgPool2d(3, 1, 1, divisor_override=5)),
    "upsample-nearest-x3": lambda: layer(nn.Upsample(scale_factor=3, mode="nearest")),
    "upsample-nearest-exact-size": lambda: layer(nn.Upsample(size=(50, 70), mode="nearest-exact")),
    "upsample-bilinear-align": lambda: layer(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    ),
    "upsample-bilinear-size": lambda: layer(nn.Upsample(size=(37, 61), mode="bilinear")),
    "batchnorm-momentum-none": lambda: layer(nn.BatchNorm2d(3, momentum=None)),
    "batchnorm-no-affine-no-stats": lambda: layer(
        nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    ),
    "instancenorm-tracked": lambda: layer(nn.InstanceNorm2d(3, track_running_stats=True)),
    "groupnorm-no-affine": lambda: layer(nn.GroupNorm(3, 3, affine=False)),
    "global-avg-pool": lambda: layer(nn.AdaptiveAvgPool2d(1)),
    "global-max-pool": lambda: layer(nn.AdaptiveMaxPool2d((1, 1))),
    "relu-inplace-dropout0": lambda: layer(nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Dropout(0)),
}


def build_layer(name: str) -> nn.Module:
    return LAYERS[name]()


@pytest.mark.parametrize("grid", [(2, 2), (3, 1)], ids=lambda g: "x".join(map(str, g)))
def test_every_layer_rule(grid: tuple[int, ...]) -> None:
    shape = (24, 36) if grid == (2, 2) else (36, 30)
    cases = [
        Case(
            f"{name}-{dtype}",
            functools.partial(build_layer, name),
            shape,
            grid,
            dtype=dtype,
            seed=i,
        )
        for i, name in enumerate(LAYERS)
        for dtype in (torch.float64, torch.float32)
    ]
    run(cases, 4 if grid == (2, 2) else 3)


def test_eval_mode_uses_running_statistics() -> None:
    cases = [
        Case("unet-eval-batch", functools.partial(unet, 2, "batch", "linear"), (24, 32), (2, 2),
             train=False),
    ]  # fmt: skip
    run(cases, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_data_parallel_over_spatial_blocks(dtype: torch.dtype) -> None:
    from _equivalence import data_space_worker

    for errs in run_distributed(data_space_worker, 4, dtype):
        assert errs["param_grad"] <= tolerance(dtype), errs


@pytest.mark.parametrize("grid", [(2, 2), (1, 2, 2)], ids=lambda g: "x".join(map(str, g)))
def test_block_losses_equal_whole_image(grid: tuple[int, ...]) -> None:
    pytest.importorskip("monai")
    from _equivalence import losses_worker

    for errs in run_distributed(losses_worker, 4, grid):
        assert max(errs.values()) <= 1e-10, errs
        assert set(errs) == {
            "cross_entropy", "cross_entropy_grad", "soft_dice", "soft_dice_grad", "accuracy"
        }  # fmt: skip
