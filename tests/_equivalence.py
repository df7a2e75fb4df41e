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
from haloseg.parallel.alignment import downsampling_factor


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
    memory_format: torch.memory_format = torch.contiguous_format
    """Layout of the partitioned model's weights and input blocks (the reference stays
    contiguous); the outputs and input gradients must come back in it."""


def tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative difference in the 2-norm, ``|a - b| / |b|`` (computed in fp64).

    fp32 sums over many pixels in another order differ by rounding (~1e-7 per element);
    the norm-wise relative error is the measure that does not single out one tiny element.
    """
    if a.shape != b.shape:  # the blocks gathered into another shape: never close
        return float("inf")
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def _random_bounds(shape: tuple[int, ...], grid: tuple[int, ...], align: int, rng: random.Random):
    bounds = []
    for n, g in zip(shape, grid, strict=True):
        units = n // align
        cuts = sorted(rng.sample(range(1, units), g - 1)) if g > 1 else []
        bounds.append([0, *(c * align for c in cuts), n])
    return bounds


def _target(w: torch.Tensor, yl: torch.Tensor, dec: haloseg.Decomposition) -> torch.Tensor:
    """This rank's share of the whole-output weights ``w``: its block, or, for an output every
    rank holds whole (global pooling), all of it on rank 0 only, so it counts once."""
    if dec.size > 1 and yl.shape == w.shape:
        return w if dec.rank == 0 else torch.zeros_like(w)
    return dec.scatter(w, like=yl)


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
    net = haloseg.spatial_parallel(model.to(memory_format=case.memory_format), dec)
    layer_formats: list[bool] = []
    if case.memory_format != torch.contiguous_format:
        _watch_formats(net, case.memory_format, layer_formats)
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
        xl = dec.scatter(x).contiguous(memory_format=case.memory_format).requires_grad_()
        yl = net(xl)
        loss = haloseg.global_sum((yl * _target(w, yl, dec)).sum(), dec)
        loss.backward()
        if case.memory_format != torch.contiguous_format:
            worst("memory_format", float(not _in_format(yl, case.memory_format)))
            worst("memory_format_grad", float(not _in_format(xl.grad, case.memory_format)))
            worst("memory_format_layers", float(not all(layer_formats)))
        # An output every rank holds whole (global pooling) is compared as it is.
        whole = yl if dec.size > 1 and yl.shape == yr.shape else dec.gather(yl)
        worst("output", close(whole.detach(), yr.detach(), case.dtype))
        worst("input_grad", close(dec.gather(xl.grad), xr.grad, case.dtype))
        # All parameter gradients as one vector: a bias ahead of a normalisation has a true
        # gradient of zero, and its rounding noise has no meaningful relative error.
        worst("param_grad", close(_flat_grads(net), _flat_grads(ref), case.dtype))
        # Buffers as one vector too: a running mean whose true value is zero (a channel
        # normalised twice) holds rounding noise only.
        floats = [(b, c) for b, c in zip(net.buffers(), ref.buffers(), strict=True)
                  if b.is_floating_point()]  # fmt: skip
        if floats:
            ours, theirs = zip(*floats, strict=True)
            worst("buffers", close(_flat(ours), _flat(theirs), case.dtype))
        for b, c in zip(net.buffers(), ref.buffers(), strict=True):
            if not b.is_floating_point():
                worst("buffers", float((b != c).any()))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        worst("weights_after_step", close(_flat(net.parameters()), _flat(ref.parameters()),
                                          case.dtype))  # fmt: skip
    return errs


def _watch_formats(net: nn.Module, fmt: torch.memory_format, seen: list[bool]) -> None:
    """Record, for every leaf layer whose input is strictly in ``fmt`` (not also plainly
    contiguous), whether its output is in ``fmt`` too."""

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() > 3:
            if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
                seen.append(_in_format(out, fmt))

    for m in net.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)


def _in_format(t: torch.Tensor, fmt: torch.memory_format) -> bool:
    """``t`` is laid out in ``fmt`` (a channels-last tensor of one channel or one pixel is
    both channels-last and contiguous: either counts)."""
    return t.is_contiguous(memory_format=fmt)


def _flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _flat_grads(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one vector; parameters a forward never uses (a classifier
    head beside a U-Net's features) count as zero."""
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                      for p in model.parameters()])  # fmt: skip


def run_cases(cases: list[Case]) -> list[tuple[str, dict[str, float]]]:
    """Worker: every rank runs every case; returns (name, errors) per case."""
    return [(c.name, check_case(c)) for c in cases]


def _adjoint_gap(fx: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """|<F x, y> - <x, F* y>| / |<F x, y>| summed over ranks for a random ``y``, and F* y.

    ``F`` is the map from the leaf block ``x`` to ``fx`` (every rank's pair together)."""
    y = torch.randn_like(fx)
    (fty,) = torch.autograd.grad(fx, x, y)
    both = torch.stack([(fx * y).sum(), (x * fty).sum()]).detach()
    dist.all_reduce(both)
    return abs(both[0].item() - both[1].item()) / abs(both[0].item()), fty


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _is_channels_last(t: torch.Tensor) -> bool:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def adjoint_worker(cases: list[tuple[tuple[int, ...], object, bool, bool]]) -> dict[str, Any]:
    """Per case ``(grid, padding, periodic, channels_last)`` of a 3x3-conv halo exchange:
    the relative adjoint gap summed over ranks and, for channels-last blocks, whether the
    window and the block's gradient are channels-last too."""
    from haloseg.geometry import ConvAxis, boxes_from_bounds, out_bounds, plan_exchange
    from haloseg.parallel.halo import HaloExchange

    torch.manual_seed(dist.get_rank())
    gaps, formats = {}, {}
    for grid, padding, periodic, channels_last in cases:
        name = f"{'x'.join(map(str, grid))}/{padding}/periodic={periodic}/cl={channels_last}"
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
        x = torch.randn(2, 3, *(b - a for a, b in box), dtype=torch.float64)
        x = (_channels_last(x) if channels_last else x).requires_grad_()
        fx = HaloExchange.apply(x, plan, padding, dec.peers, dec.group)
        gaps[name], fty = _adjoint_gap(fx, x)
        if channels_last:
            formats[name] = (_is_channels_last(fx), _is_channels_last(fty))
    return {"gaps": gaps, "formats": formats}


def conv_adjoint_worker() -> dict[str, Any]:
    """Adjoint gaps of partitioned convolutions as linear maps of the block (weight fixed, no
    bias) on a 2x2 grid, contiguous and channels-last: the banded path (stride 1, symmetric
    zero padding) and the haloed path (reflect padding, stride 2). Also which autograd
    Function ran, and whether channels-last blocks gave channels-last outputs and gradients."""
    torch.manual_seed(0)
    convs = {
        "banded": nn.Conv2d(3, 4, 3, padding=1, bias=False),
        "reflect": nn.Conv2d(3, 4, 3, padding=1, bias=False, padding_mode="reflect"),
        "stride2": nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
    }
    dec = haloseg.Decomposition((2, 2))
    nets = {k: haloseg.spatial_parallel(m.double(), dec) for k, m in convs.items()}
    torch.manual_seed(1 + dist.get_rank())
    out: dict[str, Any] = {"gaps": {}, "functions": {}, "formats": {}}
    for name, net in nets.items():
        for channels_last in (False, True):
            key = f"{name}/cl={channels_last}"
            x = dec.scatter(torch.randn(2, 3, 16, 20, dtype=torch.float64))
            x = (_channels_last(x) if channels_last else x).requires_grad_()
            fx = net(x)
            out["functions"][key] = type(fx.grad_fn).__name__
            out["gaps"][key], fty = _adjoint_gap(fx, x)
            out["formats"][key] = (_is_channels_last(fx), _is_channels_last(fty))
    return out


def scatter_like_worker() -> dict[str, Any]:
    """A target scattered ``like`` the output of a valid-padded convolution on uneven 2x2
    blocks, against the gathered output sliced by the output's own block boundaries."""
    from haloseg.errors import DecompositionError
    from haloseg.geometry import boxes_from_bounds
    from haloseg.parallel.halo import box_slices

    torch.manual_seed(0)
    dec = haloseg.Decomposition((2, 2), bounds=[[0, 6, 16], [0, 12, 20]])
    net = haloseg.spatial_parallel(nn.Conv2d(2, 3, 3).double(), dec)
    x = torch.randn(2, 2, 16, 20, dtype=torch.float64)
    with torch.no_grad():
        y_local = net(dec.scatter(x))
    y = dec.gather(y_local)
    target = torch.randn_like(y)
    want = box_slices(boxes_from_bounds(dec.bounds_of(y_local.shape[2:]))[dec.rank])
    out: dict[str, Any] = {
        "global": tuple(y.shape),
        "local": tuple(y_local.shape),
        "target_equal": torch.equal(dec.scatter(target, like=y_local), target[want]),
        "output_equal": torch.equal(dec.scatter(y, like=y_local), y_local),
    }
    try:
        dec.scatter(target[..., :-1], like=y_local)
        out["refusal"] = None
    except DecompositionError as e:
        out["refusal"] = str(e)
    try:  # the input's bounds do not fit the output: plain scatter cannot slice it
        dec.scatter(target)
        out["plain_refusal"] = None
    except DecompositionError as e:
        out["plain_refusal"] = str(e)
    return out


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
    loss = haloseg.global_sum((yl * dec.scatter(w[rows], like=yl)).sum(), dec) / 2
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
