"""Layer-wise training (forward over blocks with every layer's output kept, then backward
over blocks in reverse) equals plain autograd on the whole image: outputs, input gradients,
parameter gradients and running statistics, for haloseg's U-Net in every norm and
up-sampling mode and for MONAI's networks; over optimizer steps through ``LayerwiseModule``;
its compute memory does not grow with the image."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _layerwise_cases import Zoo, one_thread, rel, small_unet  # noqa: F401 (one_thread: autouse)
from haloseg.bench.layerwise import UncountedStore
from haloseg.errors import DataError, UnsupportedLayerError
from haloseg.layerwise import LayerwiseExecutor, LayerwiseModule, MemoryStore
from haloseg.memory.tracker import LiveBytes
from haloseg.models.unet import NORMS, UPSAMPLINGS, UNet


def _compare(m: nn.Module, x: torch.Tensor, block: object, tol: float,
             store: object = "memory") -> LayerwiseExecutor:  # fmt: skip
    """One training forward and backward, layer-wise on ``m`` and plain on a copy: output,
    image gradient, every parameter's gradient (relative to the largest, since a bias before
    a normalisation has a gradient of zero up to rounding) and every buffer."""
    eager = copy.deepcopy(m)
    xr = x.clone().requires_grad_()
    ref = eager(xr)
    g = torch.randn_like(ref)
    ref.backward(g)
    ex = LayerwiseExecutor(m, block=block, store=store)  # type: ignore[arg-type]
    y = ex.forward(x, input_grad=True)
    gx = ex.backward(g)
    assert rel(y, ref.detach()) < tol
    assert rel(gx, xr.grad) < tol
    scale = max(p.grad.abs().max() for p in eager.parameters())
    for (name, p), q in zip(m.named_parameters(), eager.parameters(), strict=True):
        assert ((p.grad - q.grad).abs().max() / scale).item() < tol, name
    for (name, a), b in zip(m.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-3, msg=name)
    return ex


def _unet(n: int, norm: str, up: str, dtype: torch.dtype = torch.float64) -> UNet:
    return small_unet(n, norm, up, dtype).train()


@pytest.mark.parametrize(("norm", "up"), [(n, u) for n in NORMS for u in UPSAMPLINGS])
def test_unet_2d_training_fp64(norm: str, up: str) -> None:
    x = torch.randn(2, 2, 24, 28, dtype=torch.float64)
    _compare(_unet(2, norm, up), x, (7, 9), 1e-10)


@pytest.mark.parametrize(("norm", "up"), [("batch", "transposed"), ("instance", "linear"),
                                          ("group", "nearest")])  # fmt: skip
def test_unet_3d_training_fp64(norm: str, up: str) -> None:
    x = torch.randn(2, 2, 12, 8, 16, dtype=torch.float64)
    _compare(_unet(3, norm, up), x, (5, 3, 7), 1e-10)


@pytest.mark.parametrize(("n", "norm", "up"), [(2, "batch", "linear"), (3, "group", "transposed")])
def test_unet_training_fp32(n: int, norm: str, up: str) -> None:
    x = torch.randn(1, 2, *((32, 20) if n == 2 else (8, 12, 16)))
    _compare(_unet(n, norm, up, torch.float32), x, 5, 1e-5)


@pytest.mark.parametrize("block", [3, (5, 7), 64])
def test_padding_modes_in_place_ops_and_weights_computed_from_parameters(block: object) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 2, 18, 22, dtype=torch.float64)
    _compare(Zoo().double().train(), x, block, 1e-10)


def test_float32_uses_onednn_blocks_within_float32_rounding() -> None:
    """On the CPU, float32 blocks run oneDNN convolutions (forward and both gradients),
    dilated ones included; equal to plain autograd within float32 rounding."""
    torch.manual_seed(2)
    _compare(Zoo().train(), torch.randn(2, 2, 18, 22), (5, 7), 1e-5)


def test_zarr_store_equals_memory_and_leaves_no_arrays(tmp_path: Path) -> None:
    x = torch.randn(1, 2, 16, 20, dtype=torch.float64)
    _compare(_unet(2, "group", "linear"), x, (6, 7), 1e-10, store=tmp_path / "acts")
    assert list((tmp_path / "acts").iterdir()) == []


monai_nets = pytest.importorskip("monai.networks.nets")

MONAI = {
    "UNet": lambda: monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                                    channels=(4, 8, 8), strides=(2, 2), num_res_units=1,
                                    norm="batch"),
    "UNet-prelu": lambda: monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2,
                                          channels=(4, 8, 8), strides=(2, 2), num_res_units=2,
                                          norm="instance", act="PRELU"),
    "SegResNet": lambda: monai_nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2,
                                              init_filters=8, blocks_down=(1, 2),
                                              blocks_up=(1,)),
    "BasicUNet": lambda: monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                                              features=(4, 4, 8, 8, 16, 4)),
}  # fmt: skip
SHAPES = {"UNet": (8, 12, 16), "UNet-prelu": (32, 28), "SegResNet": (8, 12, 16),
          "BasicUNet": (37, 30)}  # fmt: skip


@pytest.mark.parametrize("name", list(MONAI))
def test_monai_networks_training_fp64(name: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 1, *SHAPES[name], dtype=torch.float64)
    _compare(MONAI[name]().double().train(), x, 5, 1e-10)


def test_module_trains_over_optimizer_steps_like_plain_autograd() -> None:
    m = _unet(2, "batch", "linear")
    m.encoder[0][1].momentum = None  # cumulative average: the batch counter matters too
    eager = copy.deepcopy(m)
    net = LayerwiseModule(m, block=8)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2),
            torch.optim.AdamW(eager.parameters(), lr=1e-2)]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 2, 24, 28, dtype=torch.float64, generator=gen)
        t = torch.randint(0, 3, (2, 24, 28), generator=gen)
        losses = []
        for model, opt in zip((net, eager), opts, strict=True):
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for (name, a), b in zip(m.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    net.eval()
    eager.eval()
    with torch.no_grad():
        assert rel(net(x), eager(x)) < 1e-10


def test_an_image_that_requires_grad_gets_its_gradient_through_the_module() -> None:
    m = _unet(2, "instance", "nearest")
    eager = copy.deepcopy(m)
    x = torch.randn(1, 2, 16, 20, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (LayerwiseModule(m, block=6)(x) ** 2).sum().backward()
    (eager(x2) ** 2).sum().backward()
    assert rel(x.grad, x2.grad) < 1e-10


def test_backward_frees_every_store_but_the_image_gradient() -> None:
    store = MemoryStore()
    ex = LayerwiseExecutor(_unet(2, "group", "transposed"), block=8, store=store)
    y = ex.forward(torch.randn(1, 2, 16, 16, dtype=torch.float64), input_grad=True)
    held = ex.report.peak_store_bytes
    assert len(store.arrays) > 5 and held > 0
    ex.backward(torch.ones_like(y))
    assert list(store.arrays) == ["grad-x"]
    assert ex.report.peak_store_bytes > held  # gradients held beside the activations


def test_compute_memory_of_a_training_step_does_not_grow_with_the_image() -> None:
    torch.manual_seed(0)
    m = UNet(spatial_dims=3, in_channels=1, out_channels=2, depth=2, base_channels=4,
             norm="instance", upsampling="transposed").train()  # fmt: skip
    peaks = []
    for side in (16, 32):  # 8x the voxels
        meter = LiveBytes("cpu")
        ex = LayerwiseExecutor(m, block=16, store=UncountedStore(meter))
        x = torch.randn(1, 1, side, side, side)
        grad = torch.ones(1, 2, side, side, side)  # the loss's, whole: the caller's tensor
        with meter:
            ex.forward(x)
            ex.backward(grad)
        peaks.append(meter.peak)
    assert peaks[1] < 1.5 * peaks[0], peaks


@pytest.mark.parametrize(("norm", "up", "block"), [("instance", "transposed", 12),
                                                   ("batch", "linear", 16)])  # fmt: skip
def test_the_training_budget_bounds_the_compute_memory_held(norm: str, up: str,
                                                            block: int) -> None:  # fmt: skip
    """What ``block_for_budget(train=True)`` counts for a block (the largest node's
    backward, and the weights with their gradients and AdamW's moments) bounds what a
    training step holds, measured tensor by tensor."""
    from haloseg.layerwise.budget import block_bytes, parameter_bytes
    from haloseg.layerwise.graph import plan_steps

    torch.manual_seed(0)
    m = UNet(spatial_dims=3, in_channels=1, out_channels=2, depth=2, base_channels=4,
             norm=norm, upsampling=up).train()  # fmt: skip
    x, grad = torch.randn(1, 1, 32, 32, 32), torch.ones(1, 2, 32, 32, 32)
    meter = LiveBytes("cpu")
    ex = LayerwiseExecutor(m, block=block, store=UncountedStore(meter))
    with meter:
        ex.forward(x)
        ex.backward(grad)
    steps = plan_steps(m, x.shape, x.dtype)
    counted = block_bytes(steps, [block] * 3, [32] * 3, train=True)
    assert meter.peak <= counted + parameter_bytes(m, train=True)


def test_dropout_in_training_is_refused_by_name() -> None:
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Dropout(0.3)).train()
    with pytest.raises(UnsupportedLayerError, match="'1': dropout in training mode"):
        LayerwiseExecutor(m, block=4).forward(torch.randn(1, 1, 8, 8))


def test_backward_without_a_forward_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="backward needs a forward first"):
        LayerwiseExecutor(nn.Conv2d(1, 1, 3), block=4).backward(torch.ones(1, 1, 6, 6))


# -- the user's path: haloseg train ... memory.executor=layerwise, then haloseg infer ----------

TINY = ("model.preset=small", "model.depth=2", "model.base_channels=4", "train.steps=2",
        "train.val_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
        "train.dtype=float64")  # fmt: skip


def test_train_cli_layerwise_equals_plain_training_and_is_served(tmp_path: Path) -> None:
    """configs/msd-brain-tumour.yaml (InstanceNorm), reduced, on NIfTI volumes with raw
    intensities and a non-identity affine: two steps layer-wise equal two plain steps on
    every weight; the run is then served layer-wise from its file."""
    import nibabel as nib
    import numpy as np

    from _user_path import cli, scanner_data, train
    from haloseg.training.checkpoint import load_checkpoint

    data = scanner_data(tmp_path / "Task01", "msd", [24, 20, 12], 4, images=3, classes=4)
    common = ("msd-brain-tumour.yaml", f"data.path={data}", *TINY)
    plain = train(common[0], tmp_path / "plain", *common[1:])
    layer = train(common[0], tmp_path / "layer", *common[1:], "memory.executor=layerwise",
                  "memory.block=[7,5,4]")  # fmt: skip
    a, b = load_checkpoint(plain / "checkpoints"), load_checkpoint(layer / "checkpoints")
    assert a is not None and b is not None
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=1e-9, atol=1e-12, msg=name)
    source = data / "imagesTr" / "case_002.nii.gz"
    out = tmp_path / "case_002_seg.nii.gz"
    code, _, err = cli("infer", "--checkpoint", str(layer), "--input", str(source),
                       "--output", str(out), "--executor", "layerwise", "--block", "8",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    seg = nib.load(out)
    np.testing.assert_allclose(seg.affine, nib.load(source).affine)
    assert seg.shape == (24, 20, 12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("parallel.grid=[1,2,1]",), "parallel.grid=\\[1, 2, 1\\] does not combine"),
        (("memory.swap=all",), "memory.swap=all does not combine"),
        (("memory.block=[8,8]",), "memory.block=\\[8, 8\\] has 2 values for 3-D images"),
        (("memory.executor=autograd", "memory.block=8"), "applies to memory.executor=layerwise"),
    ],
)
def test_train_cli_refuses_what_layerwise_cannot_run(tmp_path: Path, extra: tuple,
                                                     message: str) -> None:  # fmt: skip
    from _user_path import CONFIGS, cli

    code, _, err = cli("train", str(CONFIGS / "ellipsoids-3d.yaml"), f"output_dir={tmp_path}/r",
                       "device=cpu", "parallel.data=1", "parallel.grid=null",
                       "memory.executor=layerwise", *extra,
                       "--no-progress")  # fmt: skip
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r" / "checkpoints").exists()
