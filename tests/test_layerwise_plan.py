"""The layer-wise costs counted from the steps (device bytes per block, host store bytes,
host-link traffic) against hand counts and a measured run, and ``haloseg plan`` /
``haloseg train --plan`` pricing layer-wise execution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _layerwise_cases import one_thread  # noqa: F401 (autouse: one torch thread)
from _user_path import cli
from haloseg.layerwise import LayerwiseExecutor
from haloseg.layerwise.budget import block_bytes, block_for_budget, link_bytes, store_bytes
from haloseg.layerwise.graph import plan_steps
from haloseg.models.unet import UNet


def _unet(n: int, norm: str = "batch", up: str = "transposed") -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=n, in_channels=2, out_channels=3, depth=2, base_channels=4,
                norm=norm, upsampling=up)  # fmt: skip


def _meta_steps(model: nn.Module, shape: tuple[int, ...]) -> list:
    return plan_steps(model.to("meta"), shape, torch.float32)


def test_training_needs_more_device_bytes_growing_with_the_block_not_the_image() -> None:
    m = _unet(3, "instance", "linear")
    small, large = _meta_steps(m, (1, 2, 64, 64, 64)), _meta_steps(m, (1, 2, 128, 128, 128))
    for steps, image in ((small, [64] * 3), (large, [128] * 3)):
        assert block_bytes(steps, [16] * 3, image, train=True) > 1.5 * block_bytes(
            steps, [16] * 3, image
        )
    for train in (False, True):
        b16 = block_bytes(small, [16] * 3, [64] * 3, train=train)
        assert b16 == block_bytes(large, [16] * 3, [128] * 3, train=train)
        assert block_bytes(small, [32] * 3, [64] * 3, train=train) > 4 * b16


def test_a_training_budget_gives_a_smaller_block() -> None:
    m = _unet(3, "group", "transposed").to("meta")
    shape = (1, 2, 128, 128, 128)
    steps = _meta_steps(m, shape)
    infer = block_for_budget(m, shape, torch.float32, 2**28, align=4, steps=steps)
    train = block_for_budget(m, shape, torch.float32, 2**28, align=4, steps=steps, train=True)
    # One block of the image in inference; a training step needs 2 per axis, evened out.
    assert infer == (128, 128, 128) and train == (64, 64, 64)


def test_store_bytes_scale_with_the_voxels() -> None:
    m = _unet(3)
    small, large = _meta_steps(m, (1, 2, 32, 32, 32)), _meta_steps(m, (1, 2, 64, 64, 64))
    for train in (False, True):
        ratio = store_bytes(large, train=train) / store_bytes(small, train=train)
        assert ratio == pytest.approx(8, rel=0.01)
    assert store_bytes(small, train=True) > 2 * store_bytes(small)


CASES = [("batch", "transposed"), ("group", "linear"), ("instance", "nearest"),
         ("none", "transposed")]  # fmt: skip


@pytest.mark.parametrize(("norm", "up"), CASES)
def test_store_bytes_equal_the_executors_measured_peak(norm: str, up: str) -> None:
    m = _unet(2, norm, up).eval()
    x = torch.randn(1, 2, 32, 24)
    run = LayerwiseExecutor(m, block=(8, 16))
    run.run(x)
    assert store_bytes(plan_steps(m, x.shape, x.dtype)) == run.report.peak_store_bytes > 0


@pytest.mark.parametrize(("norm", "up"), CASES)
def test_training_store_bytes_equal_the_executors_measured_peak(norm: str, up: str) -> None:
    m = _unet(2, norm, up)
    x = torch.randn(1, 2, 32, 24)
    steps = plan_steps(m, x.shape, x.dtype)
    for input_grad in (False, True):
        run = LayerwiseExecutor(m, block=(8, 16))
        y = run.forward(x, input_grad=input_grad)
        run.backward(torch.ones_like(y))
        counted = store_bytes(steps, train=True, input_grad=input_grad)
        assert counted == run.report.peak_store_bytes > store_bytes(steps)


def _two_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))


def test_store_and_link_bytes_by_hand() -> None:
    steps = plan_steps(_two_convs(), (1, 1, 8, 8), torch.float32)
    x, a, b = 64 * 4, 2 * 64 * 4, 3 * 64 * 4  # the image, conv+relu, the last conv
    # Inference: conv+relu's store is freed after the last conv has read it.
    assert store_bytes(steps) == a + b
    # Training: both outputs kept; the output's gradient replaces the output, conv+relu's
    # gradient joins them at the last conv's backward; the image's gradient (if wanted)
    # comes after the last conv's gradient and conv+relu's output are gone.
    assert store_bytes(steps, train=True) == 2 * a + b
    assert store_bytes(steps, train=True, input_grad=True) == 2 * a + b
    # One block each: the windows' voxels in the image once, each output written once; the
    # backward reads the windows and the output gradients, writes the windows' gradients.
    forward = (x + a) + (a + b)
    backward = (x + a + x) + (a + b + a)
    assert link_bytes(steps, [8, 8], [8, 8]) == forward
    assert link_bytes(steps, [8, 8], [8, 8], train=True) == forward + backward
    # Blocks of 4: each of the 2x2 windows is 5x5 within the image (a one-voxel halo inside).
    assert link_bytes(steps, [4, 4], [8, 8]) == (100 * 4 + a) + (2 * 100 * 4 + b)


def test_plan_prints_the_layerwise_table_and_the_config() -> None:
    code, out, err = cli("plan", "--image", "256x256", "--channels", "8", "--depth", "3",
                         "--device-memory", "1GB")  # fmt: skip
    assert code == 0, err
    assert "layer-wise on one device (train step / inference" in out
    for block in ("32x32", "64x64", "128x128", "(budget)"):
        assert block in out
    assert "memory.executor=layerwise memory.block=[256, 256]" in out


def test_plan_takes_layerwise_blocks_and_says_when_none_fits() -> None:
    code, out, _ = cli("plan", "--image", "64x64", "--depth", "2", "--device-memory", "1MB",
                       "--layerwise-block", "16", "100")  # fmt: skip
    assert code == 0
    assert "16x16" in out and "64x64" in out and "32x32" not in out
    assert "fits no block" in out and "memory.executor=layerwise" not in out


def test_plan_refuses_a_zero_block_in_one_line() -> None:
    code, out, err = cli("plan", "--image", "64x64", "--layerwise-block", "0")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--layerwise-block 0" in err


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["memory.block=[32]"], "block 32x32 (memory.block"),
        (["memory.device_memory=20MB"], "the fewest within memory.device_memory=20MB"),
        ([], "block 64x64 (the default"),
    ],
)
def test_train_plan_prints_the_layerwise_block(overrides: list[str], said: str) -> None:
    code, out, err = cli("train", "configs/ellipses-2d.yaml", "memory.executor=layerwise",
                         "parallel.grid=null", *overrides, "--plan")  # fmt: skip
    assert code == 0, err
    assert said in out and "layer-wise on one device" in out
    assert "predicted peak memory" not in out


def test_train_plan_refuses_a_block_of_the_wrong_dims() -> None:
    code, _, err = cli("train", "configs/ellipses-2d.yaml", "memory.executor=layerwise",
                       "parallel.grid=null", "memory.block=[8,8,8]", "--plan")  # fmt: skip
    assert code == 2 and "2-D" in err and len(err.strip().splitlines()) == 1
