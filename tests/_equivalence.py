"""Workers for the multi-process equivalence tests (importable by spawned processes)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import haloseg
from haloseg.geometry import split_extent
from haloseg.parallel.convert import downsampling_factor


@dataclass
class Case:
    """One equivalence check: a model factory, an image shape and a grid."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    in_channels: int = 2
    dtype: torch.dtype = torch.float64
    batch: int = 2
    uneven: bool = True
    seed: int = 0
    steps: int = 2
    train: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative difference in the 2-norm, ``|a - b| / |b|`` (computed in fp64).

    fp32 sums over many pixels in another order differ by rounding (~1e-7 per element);
    the norm-wise relative error is the measure that does not single out one tiny element.
    """
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def _random_bounds(shape: tuple[int, ...], grid: tuple[int, ...], align: int, rng: random.Random):
    bounds = []
    for n, g in zip(shape, grid, strict=True):
        units = n // align
        cuts = sorted(rng.sample(range(1, units), g - 1)) if g > 1 else []
        bounds.append([0, *(c * align for c in cuts), n])
    return bounds


def _box_slices(y: torch.Tensor, dec: haloseg.Decomposition) -> tuple[slice, ...]:
    bounds = dec.bounds_of(y.shape[2:])
    return (
        slice(None),
        slice(None),
        *(slice(b[c], b[c + 1]) for b, c in zip(bounds, dec.coords, strict=True)),
    )


def check_case(case: Case) -> dict[str, float]:
    """Run ``case`` single-process and spatially partitioned; return relative errors."""
    torch.manual_seed(case.seed)
    model = case.build().to(case.dtype)
    model.train(case.train)
    ref = copy.deepcopy(model)
    align = downsampling_factor(model, len(case.grid))
    rng = random.Random(case.seed)
    bounds = (
        _random_bounds(case.shape, case.grid, align, rng)
        if case.uneven
        else [split_extent(n, g, align) for n, g in zip(case.shape, case.grid, strict=True)]
    )
    dec = haloseg.Decomposition(case.grid, bounds=bounds)
    net = haloseg.spatial_parallel(model, dec)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    errs: dict[str, float] = {}

    def worst(key: str, value: float) -> None:
        errs[key] = max(errs.get(key, 0.0), value)

    # fp32 checks one step: after an optimizer step the ~1e-7 rounding differences of the
    # weights are amplified by the next step; fp64 checks two (running statistics, momentum).
    steps = case.steps if case.dtype == torch.float64 else 1
    for _step in range(steps):
        x = torch.randn(case.batch, case.in_channels, *case.shape, dtype=case.dtype)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        w = torch.randn_like(yr)
        (yr * w).sum().backward()
        xl = dec.scatter(x).requires_grad_()
        yl = net(xl)
        loss = haloseg.global_sum((yl * w[_box_slices(yl, dec)]).sum(), dec)
        loss.backward()
        worst("output", close(dec.gather(yl.detach()), yr.detach(), case.dtype))
        worst("input_grad", close(dec.gather(xl.grad), xr.grad, case.dtype))
        # All parameter gradients as one vector: a bias ahead of a normalisation has a true
        # gradient of zero, and its rounding noise has no meaningful relative error.
        worst("param_grad", close(_flat_grads(net), _flat_grads(ref), case.dtype))
        for (_name, b), c in zip(net.named_buffers(), ref.buffers(), strict=True):
            if b.is_floating_point():
                worst("buffers", close(b, c, case.dtype))
            else:
                worst("buffers", float((b != c).any()))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            worst("weights_after_step", close(p.detach(), q.detach(), case.dtype))
    return errs


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def run_cases(cases: list[Case]) -> list[tuple[str, dict[str, float]]]:
    """Worker: every rank runs every case; returns (name, errors) per case."""
    return [(c.name, check_case(c)) for c in cases]


def adjoint_worker(grid: tuple[int, ...], padding: object, periodic: bool) -> float:
    """<F x, y> - <x, F* y> summed over ranks, for a 3x3-conv halo exchange."""
    from haloseg.geometry import ConvAxis, boxes_from_bounds, out_bounds, plan_exchange
    from haloseg.parallel.comm import HaloExchange

    torch.manual_seed(dist.get_rank())
    shape = tuple(7 + 3 * i for i in range(len(grid)))
    dec = haloseg.Decomposition(grid)
    bounds = [split_extent(n, g) for n, g in zip(shape, grid, strict=True)]
    rules = [ConvAxis(3, 1, 1, 1)] * len(grid)
    outs = [out_bounds(b, r) for b, r in zip(bounds, rules, strict=True)]
    windows = [
        tuple(r.in_window(a, b) for r, (a, b) in zip(rules, box, strict=True))
        for box in boxes_from_bounds(outs)
    ]
    plan = plan_exchange(
        dec.rank, boxes_from_bounds(bounds), windows, shape, [periodic] * len(grid), dec.grid
    )
    box = boxes_from_bounds(bounds)[dec.rank]
    x = torch.randn(2, 3, *(b - a for a, b in box), dtype=torch.float64, requires_grad=True)
    fx = HaloExchange.apply(x, plan, padding, dec.peers, dec.group)
    y = torch.randn_like(fx)
    (fty,) = torch.autograd.grad(fx, x, y)
    both = torch.stack([(fx * y).sum(), (x * fty).sum()]).detach()
    dist.all_reduce(both)
    return abs(both[0].item() - both[1].item()) / abs(both[0].item())


def data_space_worker(dtype: torch.dtype) -> dict[str, float]:
    """2 data replicas x (1, 2) blocks against one process on the whole batch of 4."""
    from haloseg.parallel.data import data_parallel, data_space_mesh, space_decomposition

    torch.manual_seed(0)
    model = haloseg.UNet(
        spatial_dims=2, in_channels=2, out_channels=3, depth=2, base_channels=4, norm="instance"
    ).to(dtype)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 2, 16, 24, dtype=dtype)
    w = torch.randn(4, 3, 16, 24, dtype=dtype)
    (ref(x) * w).sum().div(4).backward()
    mesh = data_space_mesh(2, (1, 2))
    dec = space_decomposition(mesh, (1, 2))
    net = data_parallel(haloseg.spatial_parallel(model, dec, sync_gradients=False), mesh)
    replica = mesh.get_local_rank("data")
    rows = slice(2 * replica, 2 * replica + 2)
    yl = net(dec.scatter(x[rows]))
    # Each replica's loss is the mean over its own samples; DDP averages the replicas.
    loss = haloseg.global_sum((yl * w[rows][_box_slices(yl, dec)]).sum(), dec) / 2
    loss.backward()
    return {"param_grad": close(_flat_grads(model), _flat_grads(ref), dtype)}


def losses_worker(grid: tuple[int, ...]) -> dict[str, float]:
    """Block losses and metrics against their whole-image values (MONAI's for Dice)."""
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    shape = (20, 28) if len(grid) == 2 else (8, 12, 10)
    logits = torch.randn(2, 3, *shape, dtype=torch.float64)
    target = torch.randint(0, 3, (2, *shape))
    dec = haloseg.Decomposition(grid, bounds=_random_bounds(shape, grid, 1, random.Random(1)))
    lr = logits.clone().requires_grad_()
    ll = dec.scatter(logits).requires_grad_()
    tl = dec.scatter(target[:, None])[:, 0]
    errs = {}
    dice = DiceLoss(softmax=True, to_onehot_y=True)
    pairs = {
        "cross_entropy": (lambda: F.cross_entropy(lr, target), haloseg.cross_entropy),
        "soft_dice": (lambda: dice(lr, target[:, None]), haloseg.soft_dice_loss),
    }
    for name, (whole, block_loss) in pairs.items():
        lr.grad = ll.grad = None
        ref, got = whole(), block_loss(ll, tl, dec)
        ref.backward()
        got.backward()
        errs[name] = abs(got.item() - ref.item()) / abs(ref.item())
        errs[name + "_grad"] = close(dec.gather(ll.grad), lr.grad, torch.float64)
    acc = (logits.argmax(1) == target).double().mean()
    errs["accuracy"] = abs(haloseg.accuracy(ll.detach(), tl, dec).item() - acc.item())
    return errs
