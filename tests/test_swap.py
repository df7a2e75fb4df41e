"""Activation swapping is transparent: a step with swapping = the same step without, bit for bit.

On CPU the swapper copies host to host, through the same pack/fetch/prefetch/drop path as on
CUDA, so these tests check the mechanism's bookkeeping; the copies and arithmetic are identical,
hence ``torch.equal`` and not a tolerance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import haloseg
from haloseg.errors import ConfigError
from haloseg.memory.swap import SWAP_POLICIES, ActivationSwapper, swap_activations
from haloseg.memory.tracker import LiveBytes
from haloseg.models import UNet
from haloseg.parallel.spawn import run_distributed

SHAPES = {2: (64, 64), 3: (16, 16, 16)}
POLICY_KWARGS = {
    "none": {"policy": "none"},
    "all": {"policy": "all"},
    "all-no-prefetch": {"policy": "all", "prefetch": 0},
    "skips": {"policy": "skips"},
    "min_bytes": {"policy": "min_bytes", "min_bytes": 256 << 10},
    "budget-0": {"policy": "budget", "budget": 0},
    "budget-1MiB": {"policy": "budget", "budget": 1 << 20},
    "budget-huge": {"policy": "budget", "budget": 1 << 40},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny fp64 convolutions gain nothing from a second thread, and on a shared 2-core
    # machine OpenMP threads waiting for a descheduled peer made these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet(dims: int, norm: str = "batch") -> UNet:
    torch.manual_seed(0)
    model = UNet(spatial_dims=dims, in_channels=2, out_channels=3, depth=2, base_channels=8,
                 norm=norm)  # fmt: skip
    return model.double()


def _inputs(dims: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[dims]
    x = torch.randn(2, 2, *shape, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
    return x, w


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor, swapper=None) -> dict:
    """One forward/backward; the loss, input gradient, parameter gradients and buffers."""
    x = x.clone().requires_grad_()
    with (
        swapper
        if swapper is not None
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    ):
        loss = (model(x) * w).sum()
        loss.backward()
    out = {"loss": loss.detach(), "input_grad": x.grad}
    out.update({f"grad:{n}": p.grad.clone() for n, p in model.named_parameters()})
    out.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    return out


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_policy_trains_exactly_as_without_swapping(dims, norm):
    x, w = _inputs(dims)
    want = _step(_unet(dims, norm), x, w)
    assert any(k.startswith("buffer:") for k in want) == (norm == "batch")
    for name, kwargs in POLICY_KWARGS.items():
        model = _unet(dims, norm)
        swapper = ActivationSwapper(model, **kwargs)
        got = _step(model, x, w, swapper)
        _assert_equal(got, want)
        stats = swapper.stats
        assert stats.bytes_in == stats.bytes_out, name  # each swapped tensor came back once
        assert (stats.tensors_swapped > 0) == (name not in ("none", "budget-huge")), name
        assert swapper.host_bytes == 0, name  # the graph is gone and its host copies with it


def _forward_bytes(policy: str, **kwargs) -> tuple[int, ActivationSwapper]:
    """Bytes on the (here: emulated) device right after forward, and the swapper."""
    model = _unet(3)
    x, w = _inputs(3)
    swapper = swap_activations(model, policy=policy, **kwargs)
    with swapper:
        with LiveBytes() as live:
            loss = (model(x) * w).sum()
        # On CPU the host copies are tensors LiveBytes counts too. Each swapped tensor's host
        # copy is a storage of its own made inside the count, and swapper.host_bytes is the sum
        # of exactly those storages, so the difference is what stayed on the compute device.
        device = live.live - swapper.host_bytes
        loss.backward()
    return device, swapper


def test_device_memory_after_forward_drops_and_policies_order_as_expected():
    plain, _ = _forward_bytes("none")
    swapped, all_ = _forward_bytes("all")
    assert swapped < 0.2 * plain, (swapped, plain)
    assert all_.stats.bytes_out > 0.7 * plain
    skips_bytes, skips = _forward_bytes("skips")
    assert 0 < skips.stats.bytes_out < all_.stats.bytes_out
    assert swapped < skips_bytes < plain
    _, huge = _forward_bytes("budget", budget=1 << 40)
    assert huge.stats.bytes_out == 0 and huge.stats.tensors_swapped == 0
    _, zero = _forward_bytes("budget", budget=0)
    assert zero.stats.bytes_out == all_.stats.bytes_out
    budget_bytes, half = _forward_bytes("budget", budget=plain // 2)
    assert 0 < half.stats.bytes_out < all_.stats.bytes_out
    assert budget_bytes <= plain // 2 + (1 << 20)  # the budget plus what is never swapped


def test_a_storage_saved_by_several_ops_is_copied_once():
    # The in-place ReLU saves its result and the pool saves the same storage as its input.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    net = net.double()
    x = torch.randn(2, 2, 64, 64, dtype=torch.float64)
    want = _step(copy.deepcopy(net), x, torch.ones(2, 8, 32, 32, dtype=torch.float64))
    swapper = ActivationSwapper(net)
    got = _step(net, x, torch.ones(2, 8, 32, 32, dtype=torch.float64), swapper)
    _assert_equal(got, want)
    # conv input, ReLU result (shared with the pool), pool indices, loss weights of the product
    assert swapper.stats.tensors_swapped == 4


def test_a_recycled_address_is_not_taken_for_the_tensor_that_died():
    # Each factor dies once swapped; the allocator often gives the next one the same address,
    # shape, strides and version: only the weak reference to the storage tells them apart.
    x = torch.randn(1 << 14, dtype=torch.float64, requires_grad=True)
    factors = []
    swapper = ActivationSwapper()
    with swapper:
        loss = x.new_zeros(())
        for i in range(4):
            t = torch.full_like(x, float(i + 1)).detach()
            factors.append(t.clone())
            loss = loss + (x * t).sum()
            del t
        loss.backward()
    assert torch.equal(x.grad, sum(factors))
    assert swapper.stats.tensors_swapped == 4


@pytest.mark.parametrize("across_blocks", [False, True], ids=["one-block", "two-blocks"])
def test_gradient_accumulation_over_two_micro_batches(across_blocks):
    xs = [_inputs(2, seed) for seed in (1, 2)]
    ref, model = _unet(2), _unet(2)
    for x, w in xs:
        (ref(x) * w).sum().backward()
    swapper = ActivationSwapper(model, policy="skips", prefetch=1)
    if across_blocks:
        for x, w in xs:
            with swapper:
                (model(x) * w).sum().backward()
    else:
        with swapper:
            for x, w in xs:
                (model(x) * w).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(b, c), name


def test_retain_graph_backward_twice_brings_the_host_copies_back_twice():
    x, w = _inputs(2)
    ref, model = _unet(2), _unet(2)
    loss = (ref(x) * w).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    swapper = ActivationSwapper(model)
    with swapper:
        loss = (model(x) * w).sum()
        loss.backward(retain_graph=True)
        assert swapper.host_bytes == swapper.stats.bytes_out > 0  # still held for the second
        loss.backward()
    assert swapper.stats.bytes_in == 2 * swapper.stats.bytes_out
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    del loss
    assert swapper.host_bytes == 0


def test_parameters_are_never_swapped():
    # The conv saves its 221 KiB weight, the product saves a view of it: both stay.
    conv = nn.Conv3d(32, 32, 3, bias=False).double()
    x = torch.randn(1, 32, 8, 8, 8, dtype=torch.float64)
    ones = torch.ones(864, 64, dtype=torch.float64, requires_grad=True)
    swapper = ActivationSwapper(conv)
    with swapper:
        y = conv(x)
        z = (conv.weight.view(32, -1) @ ones).sum()
        (y.sum() + z).backward()
    assert swapper.stats.tensors_swapped == 2  # x and ones
    assert swapper.stats.bytes_out == (x.numel() + ones.numel()) * 8


# -- under the spatial engine -------------------------------------------------------------


def _spatial_worker() -> dict[str, np.ndarray]:
    """Rank's gathered results: one process, spatial without and with swapping."""
    dec = haloseg.Decomposition((1, 2))
    x, w = _inputs(2)
    base = _unet(2)
    results = {}
    for name, policy in (("single", None), ("spatial", None), ("swapped", "all"),
                         ("swapped_skips", "skips")):  # fmt: skip
        model = copy.deepcopy(base)
        xi = x.clone().requires_grad_()
        if name == "single":
            loss = (model(xi) * w).sum()
            loss.backward()
            grad_x = xi.grad
        else:
            net = haloseg.spatial_parallel(model, dec)
            swapper = ActivationSwapper(net, policy=policy or "none")
            xl = dec.scatter(x).requires_grad_()
            with swapper:
                yl = net(xl)
                wl = dec.scatter(w)
                loss = haloseg.global_sum((yl * wl).sum(), dec)
                loss.backward()
            grad_x = dec.gather(xl.grad)
            if policy:
                assert swapper.stats.tensors_swapped > 0
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        stats = torch.cat([b.reshape(-1).double() for b in model.buffers()])
        results[name] = np.concatenate([loss.detach().reshape(1).numpy(),
                                        grad_x.reshape(-1).numpy(), grads.numpy(),
                                        stats.numpy()])  # fmt: skip
    return results


def test_swapping_under_the_spatial_engine_equals_one_process():
    ranks = run_distributed(_spatial_worker, 2, timeout=120)
    for rank in ranks:
        np.testing.assert_array_equal(rank["swapped"], rank["spatial"])
        np.testing.assert_array_equal(rank["swapped_skips"], rank["spatial"])
        # Blocks sum in another order than the whole image: fp64 rounding, not a bit match.
        np.testing.assert_allclose(rank["swapped"], rank["single"], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(ranks[0]["swapped"], ranks[1]["swapped"])


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "most"}, "pick one of none, all, skips, min_bytes, budget"),
        ({"policy": "budget"}, "needs budget="),
        ({"prefetch": -1}, "prefetch=-1 must be an integer >= 0"),
        ({"min_bytes": -5}, "min_bytes=-5"),
        ({"policy": "all", "budget": 10}, "applies to policy='budget' only"),
        ({"policy": "skips", "skip_modules": ["encodr.0"]}, "did you mean 'encoder.0'"),
        ({"policy": "all", "skip_modules": ["encoder.0"]}, "applies to policy='skips' only"),
    ],
)
def test_bad_options_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ActivationSwapper(_unet(2), **kwargs)


def test_skips_policy_needs_a_unet_or_named_modules():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="knows the skip modules of a haloseg UNet only"):
        ActivationSwapper(net, policy="skips")
    with pytest.raises(ConfigError, match="needs the model"):
        ActivationSwapper(None, policy="skips")
    assert ActivationSwapper(net, policy="skips", skip_modules=["0"]).skip_modules == ("0",)
    assert SWAP_POLICIES == ("none", "all", "skips", "min_bytes", "budget")
