"""Activation checkpointing per U-Net level: identical numbers, no repeated side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import haloseg
from _equivalence import close
from _memory_workers import checkpoint_worker
from haloseg.errors import ConfigError
from haloseg.memory.checkpoint import checkpoint_levels, unet_levels
from haloseg.memory.swap import ActivationSwapper
from haloseg.memory.tracker import LiveBytes
from haloseg.parallel.spawn import run_distributed


def _unet(spatial_dims: int = 2, norm: str = "batch", **kw: object) -> haloseg.UNet:
    torch.manual_seed(0)
    return haloseg.UNet(
        spatial_dims=spatial_dims, in_channels=1, out_channels=3, depth=2, base_channels=4,
        norm=norm, **kw,
    ).double()  # fmt: skip


def _step(model: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xi = x.clone().requires_grad_()
    loss = (model(xi) * w).sum()
    loss.backward()
    return (loss.detach(), xi.grad, *(p.grad for p in model.parameters()))


@pytest.mark.parametrize(
    ("spatial_dims", "norm", "upsampling"),
    [(2, "batch", "transposed"), (2, "group", "linear"), (3, "batch", "nearest")],
)
def test_checkpointed_step_is_identical(spatial_dims: int, norm: str, upsampling: str) -> None:
    ref = _unet(spatial_dims, norm, upsampling=upsampling)
    net = copy.deepcopy(ref)
    assert checkpoint_levels(net) == unet_levels(ref)
    shape = (2, 1, *([16] * spatial_dims))
    for _ in range(2):  # the second step also checks the running statistics of the first
        x, w = torch.randn(shape, dtype=torch.float64), torch.randn(2, 3, *shape[2:]).double()
        for a, b in zip(_step(net, x, w), _step(ref, x, w), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(net.buffers(), ref.buffers(), strict=True):
            assert torch.equal(a, b)
    assert net.state_dict().keys() == ref.state_dict().keys()


def test_plain_checkpoint_would_update_running_statistics_twice() -> None:
    """The hazard the guard exists for: torch's checkpoint alone counts the batch twice."""
    ref = _unet()
    block = copy.deepcopy(ref.encoder[0])
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    bn = block[1]
    assert int(bn.num_batches_tracked) == 2
    net = copy.deepcopy(ref)
    checkpoint_levels(net, ["encoder.0"])
    net.encoder[0](x).sum().backward()
    assert int(net.encoder[0][1].num_batches_tracked) == 1


def test_checkpointing_lowers_peak_memory() -> None:
    ref = _unet()
    net = copy.deepcopy(ref)
    checkpoint_levels(net)
    x = torch.randn(1, 1, 128, 128, dtype=torch.float64)
    peaks = []
    for m in (ref, net):
        with LiveBytes() as live:
            m(x).sum().backward()
        peaks.append(live.peak)
    assert peaks[1] < 0.75 * peaks[0]


def test_eval_and_no_grad_run_without_recomputation() -> None:
    ref = _unet()
    net = copy.deepcopy(ref)
    checkpoint_levels(net)
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ref.eval()(x))


def test_unknown_module_and_foreign_model_are_refused() -> None:
    with pytest.raises(ConfigError, match="did you mean 'encoder.0"):
        checkpoint_levels(_unet(), ["encoder.0.x"])
    with pytest.raises(ConfigError, match="name the modules"):
        checkpoint_levels(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_checkpointing_under_the_spatial_engine(norm: str) -> None:
    """Blocks with checkpointing equal blocks without and one process, and the backward
    sends exactly the messages of the uncheckpointed backward (no halo is exchanged again)."""
    results = run_distributed(checkpoint_worker, 2, (1, 2), norm)
    for r in torch.utils._pytree.tree_map(torch.as_tensor, results):
        for step in range(2):
            ys, gx = r[f"y{step}"], r[f"gx{step}"]
            assert torch.equal(ys["ckpt"], ys["plain"])
            assert torch.equal(gx["ckpt"], gx["plain"])
            assert close(ys["ckpt"], ys["ref"], torch.float64) < 1e-10
            assert close(gx["ckpt"], gx["ref"], torch.float64) < 1e-10
            assert r["messages"][("ckpt", step)] == r["messages"][("plain", step)] > 0
        assert r["messages"][("ckpt", "retained")] == r["messages"][("plain", "retained")] > 0
        for a, b in zip(r["retained_ckpt"], r["retained_plain"], strict=True):
            assert torch.equal(a, b)
        for key in ("weights", "buffers"):
            for a, b, c in zip(r[key]["ckpt"], r[key]["plain"], r[key]["ref"], strict=True):
                assert torch.equal(a, b)
                assert close(a.double(), c.double(), torch.float64) < 1e-10


def test_checkpointing_with_swapping_is_identical() -> None:
    """Both savers at once, in one process: the same loss, gradients and running statistics."""
    ref = _unet()
    net = copy.deepcopy(ref)
    checkpoint_levels(net)
    swapper = ActivationSwapper(net, policy="all")
    for _ in range(2):
        x, w = torch.randn(2, 1, 64, 64, dtype=torch.float64), torch.randn(2, 3, 64, 64).double()
        with swapper:
            got = _step(net, x, w)
        assert swapper.stats.tensors_swapped > 0
        for a, b in zip(got, _step(ref, x, w), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(net.buffers(), ref.buffers(), strict=True):
            assert torch.equal(a, b)


def test_a_retained_graph_recomputes_again() -> None:
    """backward(retain_graph=True) then backward: each recomputation replays the tape anew."""
    ref = _unet()
    net = copy.deepcopy(ref)
    checkpoint_levels(net)
    x, w = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.randn(2, 3, 16, 16).double()
    for m in (net, ref):
        loss = (m(x) * w).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(net.buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b)


def test_switching_mode_before_backward_is_refused() -> None:
    net = _unet()
    checkpoint_levels(net)
    loss = net(torch.randn(2, 1, 16, 16, dtype=torch.float64)).sum()
    net.eval()
    with pytest.raises(ConfigError, match="switched to eval mode"):
        loss.backward()


def test_nested_regions_are_refused() -> None:
    with pytest.raises(ConfigError, match="lies inside 'encoder.0'"):
        checkpoint_levels(_unet(), ["encoder.0", "encoder.0.3"])
