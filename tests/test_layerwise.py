"""Layer-wise execution (one block of one layer at a time, whole outputs in a host store)
equals plain PyTorch on the whole image: haloseg's U-Net in every norm and up-sampling,
MONAI's networks, functional calls, padding modes, training-mode statistics, zarr stores;
its compute memory does not grow with the image and it computes each voxel about once."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _layerwise_cases import Zoo, one_thread, rel, small_unet  # noqa: F401 (one_thread: autouse)
from haloseg.bench.layerwise import UncountedStore
from haloseg.errors import ConfigError, UnsupportedLayerError
from haloseg.layerwise import LayerwiseExecutor, run_layerwise
from haloseg.layerwise.graph import plan_steps
from haloseg.memory.tracker import LiveBytes
from haloseg.models.unet import NORMS, UPSAMPLINGS, UNet


def _unet(n: int, norm: str, up: str, dtype: torch.dtype = torch.float64) -> UNet:
    return small_unet(n, norm, up, dtype).eval()


def _randomise_norms(m: nn.Module) -> None:
    """Running statistics and affine parameters away from their defaults."""
    for mod in m.modules():
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            for t in (getattr(mod, "running_mean", None), getattr(mod, "bias", None)):
                if t is not None:
                    t.data.uniform_(-0.5, 0.5)
            for t in (getattr(mod, "running_var", None), getattr(mod, "weight", None)):
                if t is not None:
                    t.data.uniform_(0.5, 1.5)


CASES = [(n, norm, up) for n in (2, 3) for norm in NORMS for up in UPSAMPLINGS]


@pytest.mark.parametrize(("n", "norm", "up"), CASES)
def test_unet_fp64_equals_whole_image(n: int, norm: str, up: str) -> None:
    m = _unet(n, norm, up)
    _randomise_norms(m)
    shape = (24, 28) if n == 2 else (12, 8, 16)
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    block = (7, 9) if n == 2 else (5, 3, 7)  # odd, dividing nothing
    with torch.no_grad():
        ref = m(x)
    y = run_layerwise(m, x, block=block)
    assert rel(y, ref) < 1e-10


@pytest.mark.parametrize(("n", "norm", "up"), [(2, "batch", "linear"), (2, "group", "transposed"),
                                               (3, "instance", "nearest")])  # fmt: skip
def test_unet_fp32_equals_whole_image(n: int, norm: str, up: str) -> None:
    m = _unet(n, norm, up, torch.float32)
    x = torch.randn(1, 2, *((32, 20) if n == 2 else (8, 12, 16)))
    with torch.no_grad():
        ref = m(x)
    assert rel(run_layerwise(m, x, block=5), ref) < 1e-5


def test_valid_padding_unet_with_skip_crops() -> None:
    torch.manual_seed(4)
    m = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=2,
             norm="group", upsampling="linear", padding="valid").double().eval()  # fmt: skip
    x = torch.randn(1, 1, 44, 52, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    assert rel(run_layerwise(m, x, block=7), ref) < 1e-10


def test_batch_norm_training_statistics_and_running_stats() -> None:
    m = _unet(2, "batch", "transposed").train()
    m.encoder[0][1].momentum = None  # cumulative average: the counter matters too
    eager = copy.deepcopy(m)
    x = torch.randn(2, 2, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = eager(x)
    y = run_layerwise(m, x, block=(6, 5))
    assert rel(y, ref) < 1e-10
    for (name, a), (_, b) in zip(m.state_dict().items(), eager.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_instance_norm_running_stats_in_training() -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, track_running_stats=True))
    m = m.double().train()
    eager = copy.deepcopy(m)
    x = torch.randn(3, 2, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        ref = eager(x)
    assert rel(run_layerwise(m, x, block=4), ref) < 1e-10
    torch.testing.assert_close(m[1].running_var, eager[1].running_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(m[1].running_mean, eager[1].running_mean, rtol=1e-10, atol=1e-14)


def test_functional_calls_padding_modes_and_in_place_ops() -> None:
    torch.manual_seed(2)
    m = Zoo().double().eval()
    x = torch.randn(1, 2, 18, 22, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    for block in (3, (5, 7), 64):
        assert rel(run_layerwise(m, x, block=block), ref) < 1e-10


def test_zarr_store_equals_memory_and_leaves_no_arrays(tmp_path: Path) -> None:
    m = _unet(2, "group", "linear")
    x = torch.randn(1, 2, 16, 20, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    assert rel(run_layerwise(m, x, block=(6, 7), store=tmp_path / "acts"), ref) < 1e-10
    assert list((tmp_path / "acts").iterdir()) == []


monai_nets = pytest.importorskip("monai.networks.nets")


@pytest.mark.parametrize("name", ["UNet", "SegResNet"])
def test_monai_networks(name: str) -> None:
    torch.manual_seed(3)
    if name == "UNet":
        m = monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 8),
                            strides=(2, 2), num_res_units=1, norm="instance")  # fmt: skip
    else:
        m = monai_nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8,
                                 blocks_down=(1, 1), blocks_up=(1,))  # fmt: skip
    m = m.double().eval()
    x = torch.randn(1, 1, 8, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    assert rel(run_layerwise(m, x, block=5), ref) < 1e-10


BASIC_UNET_CASES = [(2, (37, 30)), (2, (32, 48)), (3, (33, 17, 16))]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("n", "shape"), BASIC_UNET_CASES)
def test_monai_basic_unet(n: int, shape: tuple[int, ...], train: bool) -> None:
    """UpCat pads the up-sampled features where a level's size is odd (a branch on shapes
    after ``torch.jit.isinstance(skip, torch.Tensor)``): tracing follows the image's shape.
    Instance norm has no running statistics, so training mode gives the same outputs."""
    torch.manual_seed(5)
    features = (4, 4, 8, 8, 16, 4) if n == 2 else (4, 4, 8, 8, 8, 4)
    m = monai_nets.BasicUNet(spatial_dims=n, in_channels=1, out_channels=2, features=features)
    m = m.double().train(train)
    x = torch.randn(1, 1, *shape, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    pads = [s.node.args[1] for s in plan_steps(m, x.shape, x.dtype) if s.node.target is F.pad]
    assert len(pads) == 4  # every UpCat keeps its skip
    assert any(any(p) for p in pads) == any(s % 16 for s in shape)
    block = (7, 9) if n == 2 else (8, 5, 7)
    assert rel(run_layerwise(m, x, block=block), ref) < 1e-10


class _ValueBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class _TypeBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] if isinstance(x, torch.Tensor) else x  # a proxy is no tensor


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_ValueBranch(), "cannot be traced by torch.fx"),
        (_TypeBranch(), "branches on tensor types or shapes"),
    ],
)
def test_branches_tracing_cannot_follow_are_refused(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        run_layerwise(model, torch.randn(1, 2, 8, 8), block=4)


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(2, 3)


class _SpatialSlice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:]


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm([6, 6])), "LayerNorm"),
        (nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1)), "only normalisation"),
        (_Transpose(), "moves voxels"),
        (_SpatialSlice(), "reaches into the spatial dimensions"),
        (nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), "circular"),
    ],
)
def test_refusals_name_the_layer(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        run_layerwise(model, torch.randn(1, 1, 8, 8), block=4)


@pytest.mark.parametrize("block", [0, (4,), "4", (4, True)])
def test_bad_block_is_a_config_error(block: object) -> None:
    with pytest.raises(ConfigError, match="block="):
        run_layerwise(nn.Conv2d(1, 1, 3), torch.randn(1, 1, 8, 8), block=block)  # type: ignore[arg-type]


@pytest.mark.parametrize("up", UPSAMPLINGS)
def test_each_voxel_is_computed_about_once(up: str) -> None:
    torch.manual_seed(0)
    m = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=4, base_channels=2,
             norm="instance", upsampling=up).eval()  # fmt: skip
    ex = LayerwiseExecutor(m, block=37)  # deep levels: blocks of 3, 5, 10 voxels
    ex.run(torch.randn(1, 1, 160, 224))
    for node in ex.report.nodes:
        assert node.plain == node.computed, node
    assert ex.report.redundancy == 1.0


def test_transposed_convolutions_with_overlapping_kernels_compute_little_twice() -> None:
    m = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1)
    ex = LayerwiseExecutor(m, block=32)  # 64 outputs a block; a window computes ~5 more per axis
    ex.run(torch.randn(1, 2, 64, 64))
    (node,) = ex.report.nodes
    assert node.plain < node.computed <= 1.2 * node.plain


def _compute_peak(m: nn.Module, shape: tuple[int, ...]) -> int:
    x = torch.randn(1, 2, *shape)
    with LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        run_layerwise(m, x, block=(8, 8, 8), store=UncountedStore(meter))
    return meter.peak


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_compute_memory_does_not_grow_with_the_image(norm: str) -> None:
    m = _unet(3, norm, "linear", torch.float32)
    small = _compute_peak(m, (16, 16, 16))
    large = _compute_peak(m, (32, 32, 32))  # 8x the voxels
    whole = 2 * 4 * 32**3 * 4  # one level-0 activation of the large image, in bytes
    assert large <= small * 1.05 + 4096
    assert large < whole


def test_every_cell_of_every_block_size_is_exact() -> None:
    m = _unet(2, "group", "transposed")
    x = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    for block in itertools.product((1, 2, 5, 12), (3, 8)):
        assert rel(run_layerwise(m, x, block=block), ref) < 1e-10, block
