"""Tests of the pure geometry: blocks, per-axis window rules and halo exchange plans.

PyTorch (CPU, float64) is the oracle throughout: output lengths and window contents are
checked against torch's own convolution, pooling, transposed-convolution and interpolation
arithmetic, and halo plans are checked by simulating the exchange on a real image.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from haloseg.errors import DecompositionError
from haloseg.geometry import (
    ConvAxis,
    IndexAxis,
    TransposedConvAxis,
    block_boxes,
    box_volume,
    boxes_from_bounds,
    grid_coords,
    grid_rank,
    intersect,
    nearest_multiples,
    out_bounds,
    plan_exchange,
    same_padding,
    split_extent,
)

DTYPE = torch.float64


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def _mask(box, shape) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[_slices(box)] = True
    return mask


# --------------------------------------------------------------------------------------------
# 1. Blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 2, 3, 4, 8, 16])
def test_split_extent_partitions_exactly(align):
    for parts in range(1, 8):
        for units in range(parts, 4 * parts + 3):
            size = units * align
            bounds = split_extent(size, parts, align)
            assert len(bounds) == parts + 1
            assert bounds[0] == 0 and bounds[-1] == size
            assert all(c % align == 0 for c in bounds)
            widths = [hi - lo for lo, hi in itertools.pairwise(bounds)]
            assert all(w >= align for w in widths)
            assert max(widths) - min(widths) <= align
            # torch.tensor_split is the oracle: earlier pieces take the remainder.
            oracle = [len(t) * align for t in torch.tensor_split(torch.arange(units), parts)]
            assert widths == oracle
            cover = torch.zeros(size, dtype=torch.int64)
            for lo, hi in itertools.pairwise(bounds):
                cover[lo:hi] += 1
            assert torch.all(cover == 1)


def test_split_extent_single_part_and_even_split():
    assert split_extent(7, 1) == [0, 7]
    assert split_extent(12, 3) == [0, 4, 8, 12]
    assert split_extent(10, 4) == [0, 3, 6, 8, 10]
    assert split_extent(48, 2, 16) == [0, 32, 48]
    assert split_extent(64, 3, 8) == [0, 24, 48, 64]


@pytest.mark.parametrize(
    ("size", "align", "lo", "hi"),
    [(100, 16, 96, 112), (17, 8, 16, 24), (31, 2, 30, 32), (65, 32, 64, 96), (5, 8, 8, 8)],
)
def test_split_extent_rejects_unaligned_size(size, align, lo, hi):
    assert nearest_multiples(size, align) == (lo, hi)
    for parts in (1, 2):
        with pytest.raises(DecompositionError, match=rf"\buse {lo} or {hi}$") as info:
            split_extent(size, parts, align)
        assert f"size {size} " in str(info.value)
        assert str(align) in str(info.value)


def test_nearest_multiples_properties():
    for size, align in itertools.product(range(1, 80), range(1, 10)):
        lo, hi = nearest_multiples(size, align)
        assert lo % align == 0 and hi % align == 0
        assert lo >= align
        assert size <= hi < size + align
        if size >= align:
            assert size - align < lo <= size
        if size % align == 0:
            assert lo == hi == size


@pytest.mark.parametrize(
    ("size", "parts", "align"),
    [(16, 4, 8), (8, 3, 4), (2, 3, 1), (0, 1, 1), (0, 2, 4), (48, 4, 16), (8, 9, 1)],
)
def test_split_extent_rejects_too_small_size(size, parts, align):
    with pytest.raises(DecompositionError, match=rf"at least {parts * align}\b"):
        split_extent(size, parts, align)


@pytest.mark.parametrize("parts", [0, -1])
def test_split_extent_rejects_no_parts(parts):
    with pytest.raises(DecompositionError, match="parts"):
        split_extent(8, parts)


GRID_CASES = [
    ((16,), (3,), 1),
    ((7, 9), (2, 2), 1),
    ((16, 24), (3, 2), 4),
    ((12, 10, 8), (2, 1, 2), 2),
    ((5, 6, 7), (1, 3, 2), 1),
    ((32, 48), (4, 3), 8),
]


@pytest.mark.parametrize(("shape", "grid", "align"), GRID_CASES)
def test_block_boxes_tile_the_image(shape, grid, align):
    boxes = block_boxes(shape, grid, align)
    assert len(boxes) == math.prod(grid)
    cover = torch.zeros(shape, dtype=torch.int64)
    for box in boxes:
        assert len(box) == len(shape)
        cover[_slices(box)] += 1
        assert box_volume(box) == cover[_slices(box)].numel() > 0
        assert all(lo % align == 0 and hi % align == 0 for lo, hi in box)
    assert torch.all(cover == 1)
    assert sum(box_volume(b) for b in boxes) == math.prod(shape)
    bounds = [split_extent(n, g, align) for n, g in zip(shape, grid)]
    assert boxes == boxes_from_bounds(bounds)
    for rank, box in enumerate(boxes):
        coords = grid_coords(rank, grid)
        assert box == tuple((bounds[d][c], bounds[d][c + 1]) for d, c in enumerate(coords))


def test_block_boxes_rejects_dimension_mismatch():
    with pytest.raises(DecompositionError, match=r"grid \(2, 2\) has 2 axes.*3 spatial"):
        block_boxes((8, 8, 8), (2, 2))


def test_block_boxes_propagates_split_errors():
    with pytest.raises(DecompositionError, match=r"use 16 or 24"):
        block_boxes((16, 20), (2, 2), 8)
    with pytest.raises(DecompositionError, match=r"at least 32"):
        block_boxes((32, 16), (1, 4), 8)


def test_boxes_from_uneven_bounds():
    bounds = [[0, 1, 5, 6], [0, 3, 4]]
    boxes = boxes_from_bounds(bounds)
    assert boxes == [
        ((0, 1), (0, 3)),
        ((0, 1), (3, 4)),
        ((1, 5), (0, 3)),
        ((1, 5), (3, 4)),
        ((5, 6), (0, 3)),
        ((5, 6), (3, 4)),
    ]
    cover = torch.zeros(6, 4, dtype=torch.int64)
    for box in boxes:
        cover[_slices(box)] += 1
    assert torch.all(cover == 1)


@pytest.mark.parametrize(
    "grid", [(1,), (5,), (2, 3), (3, 1), (1, 3), (3, 1, 2), (2, 2, 2), (4, 3, 2, 2)]
)
def test_grid_rank_coords_round_trip(grid):
    size = math.prod(grid)
    oracle = torch.stack(torch.unravel_index(torch.arange(size), grid), dim=1).tolist()
    coords = [grid_coords(r, grid) for r in range(size)]
    assert [list(c) for c in coords] == oracle
    assert coords == list(itertools.product(*(range(g) for g in grid)))
    for rank, c in enumerate(coords):
        assert grid_rank(c, grid) == rank
        assert all(0 <= ci < g for ci, g in zip(c, grid))


def test_intersect_matches_masks():
    gen = torch.Generator().manual_seed(0)
    shape = (7, 6, 5)
    overlapping = 0
    for _ in range(300):
        a, b = (
            tuple(
                tuple(sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist())) for n in shape
            )
            for _ in range(2)
        )
        common = intersect(a, b)
        both = _mask(a, shape) & _mask(b, shape)
        if common is None:
            assert not both.any()
        else:
            overlapping += 1
            assert torch.equal(_mask(common, shape), both)
            assert box_volume(common) == int(both.sum())
            assert intersect(b, a) == common
    assert overlapping > 20


def test_intersect_edge_cases():
    a = ((0, 2), (0, 3))
    assert intersect(a, ((2, 4), (0, 3))) is None  # touching faces do not overlap
    assert intersect(a, ((1, 4), (3, 5))) is None
    assert intersect(a, ((1, 4), (2, 5))) == ((1, 2), (2, 3))
    assert intersect(a, a) == a
    assert intersect(((-3, 2),), ((0, 9),)) == ((0, 2),)
    assert intersect(((1, 1),), ((0, 9),)) is None
    assert box_volume(((1, 4), (2, 7), (0, 2))) == 30
    assert box_volume(()) == 1


# --------------------------------------------------------------------------------------------
# 2. Output sizes against torch
# --------------------------------------------------------------------------------------------


def _torch_len(fn, *args, **kwargs) -> int | None:
    try:
        return fn(*args, **kwargs).shape[-1]
    except RuntimeError:
        return None


CONV_PADS = [(0, 0), (1, 1), (2, 2), (1, 0), (0, 2), (3, 1), (-1, 0), (-1, -2)]


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_conv_out_size_matches_torch(kernel, stride):
    w = torch.ones(1, 1, kernel, dtype=DTYPE)
    valid = 0
    for dilation, (pl, ph), n in itertools.product([1, 2, 3], CONV_PADS, range(1, 14)):
        rule = ConvAxis(kernel, stride, pl, ph, dilation)
        x = torch.zeros(1, 1, n, dtype=DTYPE)
        if pl == ph >= 0:
            expected = _torch_len(F.conv1d, x, w, stride=stride, padding=pl, dilation=dilation)
        elif n + pl + ph >= 1:
            xp = F.pad(x, (pl, ph))  # negative padding crops
            expected = _torch_len(F.conv1d, xp, w, stride=stride, dilation=dilation)
        else:
            expected = None
        if expected is None:
            assert rule.out_size(n) <= 0, (rule, n)
        else:
            valid += 1
            assert rule.out_size(n) == expected, (rule, n)
    assert valid > 100


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 6, 7])
def test_same_padding_matches_torch(kernel, dilation):
    pl, ph = same_padding(kernel, dilation)
    assert pl + ph == dilation * (kernel - 1)
    assert ph - pl in (0, 1)  # the odd element goes to the end
    w = _randn(kernel, 3, 2, kernel)
    rule = ConvAxis(kernel, 1, pl, ph, dilation)
    for n in (1, 2, 5, 8, 13):
        x = _randn(n, 1, 2, n)
        ref = F.conv1d(x, w, padding="same", dilation=dilation)
        assert rule.out_size(n) == n == ref.shape[-1]
        torch.testing.assert_close(F.conv1d(F.pad(x, (pl, ph)), w, dilation=dilation), ref)
        _check_windows(rule, x, ref, partial(F.conv1d, weight=w, dilation=dilation), 0.0)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_max_pool_out_size_matches_torch(kernel, ceil_mode):
    valid = 0
    for stride, dilation, n in itertools.product(range(1, 5), [1, 2, 3], range(1, 16)):
        x = torch.zeros(1, 1, n, dtype=DTYPE)
        for pad in range(kernel // 2 + 1):
            rule = ConvAxis(kernel, stride, pad, pad, dilation, ceil_mode)
            expected = _torch_len(F.max_pool1d, x, kernel, stride, pad, dilation, ceil_mode)
            if expected is None:
                assert rule.out_size(n) <= 0, (rule, n)
            else:
                valid += 1
                assert rule.out_size(n) == expected, (rule, n)
    assert valid > 100


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_avg_pool_out_size_matches_torch(kernel, ceil_mode):
    valid = 0
    for stride, n in itertools.product(range(1, 5), range(1, 16)):
        x = torch.zeros(1, 1, n, dtype=DTYPE)
        for pad in range(kernel // 2 + 1):
            rule = ConvAxis(kernel, stride, pad, pad, ceil_mode=ceil_mode)
            expected = _torch_len(F.avg_pool1d, x, kernel, stride, pad, ceil_mode)
            if expected is None:
                assert rule.out_size(n) <= 0, (rule, n)
            else:
                valid += 1
                assert rule.out_size(n) == expected, (rule, n)
    assert valid > 50


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_transposed_conv_out_size_matches_torch(kernel, stride):
    w = torch.ones(1, 1, kernel, dtype=DTYPE)
    valid = 0
    for dilation, padding, n in itertools.product([1, 2, 3], range(3), range(1, 9)):
        x = torch.zeros(1, 1, n, dtype=DTYPE)
        for op in range(max(stride, dilation)):
            rule = TransposedConvAxis(kernel, stride, padding, op, dilation)
            expected = _torch_len(
                F.conv_transpose1d,
                x,
                w,
                stride=stride,
                padding=padding,
                output_padding=op,
                dilation=dilation,
            )
            if expected is None:
                assert rule.out_size(n) <= 0, (rule, n)
            else:
                valid += 1
                assert rule.out_size(n) == expected, (rule, n)
    assert valid > 50


# --------------------------------------------------------------------------------------------
# 3. Windows against torch
# --------------------------------------------------------------------------------------------


def _window_1d(x: torch.Tensor, lo: int, hi: int, fill: float) -> torch.Tensor:
    """``x[..., lo:hi]`` in global coordinates, ``fill`` outside ``[0, n)``."""
    n = x.shape[-1]
    out = x.new_full((*x.shape[:-1], hi - lo), fill)
    a, b = max(lo, 0), min(hi, n)
    if a < b:
        out[..., a - lo : b - lo] = x[..., a:b]
    return out


def _out_ranges(m: int) -> list[tuple[int, int]]:
    pairs = {(0, m)}
    for a in range(m):
        pairs.update((a, b) for b in (a + 1, a + 2, a + 3, m) if b <= m)
    return sorted(pairs)


def _check_windows(rule, x, ref, op, fill) -> None:
    """``op`` (padding 0) on each rule window reproduces ``ref[..., a:b]``."""
    n, m = x.shape[-1], ref.shape[-1]
    assert rule.out_size(n) == m
    for a, b in _out_ranges(m):
        lo, hi = rule.in_window(a, b)
        got = op(_window_1d(x, lo, hi, fill))
        assert got.shape[-1] == b - a, (rule, n, a, b, lo, hi)
        torch.testing.assert_close(got, ref[..., a:b], rtol=0, atol=1e-12)
    for a in range(m + 1):
        lo, hi = rule.in_window(a, a)
        assert lo == hi, (rule, a)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_conv_windows_match_torch(kernel, stride):
    w = _randn(10 * kernel + stride, 3, 2, kernel)
    checked = 0
    for n, dilation in itertools.product([9, 16], [1, 2]):
        x = _randn(n, 1, 2, n)
        for pl, ph in [*CONV_PADS, same_padding(kernel, dilation)]:
            rule = ConvAxis(kernel, stride, pl, ph, dilation)
            if rule.out_size(n) < 1:
                continue
            if pl == ph >= 0:
                ref = F.conv1d(x, w, stride=stride, padding=pl, dilation=dilation)
            else:
                ref = F.conv1d(F.pad(x, (pl, ph)), w, stride=stride, dilation=dilation)
            op = partial(F.conv1d, weight=w, stride=stride, dilation=dilation)
            _check_windows(rule, x, ref, op, 0.0)
            # the window is exactly what the outputs read: no slack
            for a, b in _out_ranges(ref.shape[-1]):
                lo, hi = rule.in_window(a, b)
                assert lo == a * stride - pl
                assert hi - lo == (b - a - 1) * stride + rule.span
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_max_pool_windows_match_torch(kernel, ceil_mode):
    checked = 0
    for n, stride, dilation in itertools.product([9, 16], [1, 2, 3], [1, 2]):
        x = _randn(n + stride, 1, 2, n)
        for pad in range(kernel // 2 + 1):
            rule = ConvAxis(kernel, stride, pad, pad, dilation, ceil_mode)
            if rule.out_size(n) < 1:
                continue
            ref = F.max_pool1d(x, kernel, stride, pad, dilation, ceil_mode)
            op = partial(
                F.max_pool1d, kernel_size=kernel, stride=stride, padding=0, dilation=dilation
            )
            _check_windows(rule, x, ref, op, -math.inf)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_avg_pool_windows_match_torch(kernel):
    for n, stride in itertools.product([9, 16], [1, 2, 3]):
        x = _randn(n + stride, 1, 2, n)
        for pad in range(kernel // 2 + 1):
            rule = ConvAxis(kernel, stride, pad, pad)
            ref = F.avg_pool1d(x, kernel, stride, pad, count_include_pad=True)
            op = partial(F.avg_pool1d, kernel_size=kernel, stride=stride, padding=0)
            _check_windows(rule, x, ref, op, 0.0)


def test_crop_windows():
    x = _randn(0, 1, 2, 12)
    for pl, ph in [(-2, -2), (-3, 0), (0, -1), (-1, -4)]:
        rule = ConvAxis(1, 1, pl, ph)
        ref = x[..., -pl : 12 + ph]
        _check_windows(rule, x, ref, lambda win: win, 0.0)
        assert rule.in_window(0, rule.out_size(12)) == (-pl, 12 + ph)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_transposed_conv_windows_match_torch(kernel, stride):
    w = _randn(10 * kernel + stride, 2, 3, kernel)
    checked = 0
    for n, dilation, padding in itertools.product([7, 12], [1, 2], range(3)):
        x = _randn(n, 1, 2, n)
        for op in range(max(stride, dilation)):
            rule = TransposedConvAxis(kernel, stride, padding, op, dilation)
            m = rule.out_size(n)
            if m < 1:
                continue
            ref = F.conv_transpose1d(
                x, w, stride=stride, padding=padding, output_padding=op, dilation=dilation
            )
            assert ref.shape[-1] == m
            for a, b in _out_ranges(m):
                lo, hi = rule.in_window(a, b)
                assert lo < hi
                full = F.conv_transpose1d(
                    _window_1d(x, lo, hi, 0.0), w, stride=stride, dilation=dilation
                )
                crop = a - (lo * stride - padding)
                assert 0 <= crop and crop + (b - a) <= full.shape[-1], (rule, n, a, b, lo, hi)
                got = full[..., crop : crop + (b - a)]
                torch.testing.assert_close(got, ref[..., a:b], rtol=0, atol=1e-12)
            for a in range(m + 1):
                lo, hi = rule.in_window(a, a)
                assert lo == hi
            checked += 1
    assert checked >= 12


def test_rule_centers():
    for rule in [ConvAxis(3), ConvAxis(3, 1, 1, 1), ConvAxis(2, 2), ConvAxis(4, 2, 1, 2, 2)]:
        for j in range(10):
            lo, hi = rule.in_window(j, j + 1)
            assert rule.center(j) == Fraction(lo + hi - 1, 2)
    for rule in [
        TransposedConvAxis(2, 2),
        TransposedConvAxis(3, 2, 1, 1),
        TransposedConvAxis(4, 3, 1),
    ]:
        k = rule.dilation * (rule.kernel - 1)
        for j in range(10):
            # midpoint of the real input interval [(j + p - k) / s, (j + p) / s] feeding j
            first = Fraction(j + rule.padding - k, rule.stride)
            last = Fraction(j + rule.padding, rule.stride)
            assert rule.center(j) == (first + last) / 2
    assert TransposedConvAxis(2, 2).center(0) == Fraction(-1, 4)
    assert TransposedConvAxis(2, 2).center(1) == Fraction(1, 4)


# --------------------------------------------------------------------------------------------
# 4. IndexAxis
# --------------------------------------------------------------------------------------------


def test_index_axis_explicit():
    rule = IndexAxis((0, 0, 1, 2), (2, 3, 3, 4))
    assert rule.out_size(100) == rule.out_size(1) == 4
    assert rule.in_window(0, 1) == (0, 2)
    assert rule.in_window(1, 3) == (0, 3)
    assert rule.in_window(2, 4) == (1, 4)
    assert rule.in_window(0, 4) == (0, 4)
    assert rule.in_window(2, 2) == (1, 1)
    assert rule.in_window(4, 4) == (0, 0)
    assert rule.center(0) == Fraction(1, 2)
    assert rule.center(3) == Fraction(5, 2)
    # non-monotone ranges: min/max over the whole output range, not just its ends
    rule = IndexAxis((3, 0, 2), (5, 1, 4))
    assert rule.in_window(0, 3) == (0, 5)
    assert rule.in_window(1, 3) == (0, 4)


INTERPOLATIONS = [
    (5, 10, "nearest", None),
    (5, 7, "nearest", None),
    (6, 4, "nearest", None),
    (5, 10, "nearest-exact", None),
    (5, 10, "linear", False),
    (5, 10, "linear", True),
    (7, 5, "linear", False),
    (4, 9, "linear", True),
    (9, 3, "area", None),
]


@pytest.mark.parametrize(("n", "m", "mode", "align_corners"), INTERPOLATIONS)
def test_index_axis_matches_interpolation_support(n, m, mode, align_corners):
    eye = torch.eye(n, dtype=DTYPE).unsqueeze(1)  # batch i: unit impulse at input i
    jac = F.interpolate(eye, size=m, mode=mode, align_corners=align_corners)[:, 0, :].T
    support = [row.nonzero().flatten().tolist() for row in jac]  # inputs output j reads
    rule = IndexAxis(tuple(s[0] for s in support), tuple(s[-1] + 1 for s in support))
    assert rule.out_size(n) == m
    x = _randn(n, n)
    ref = jac @ x
    for a, b in _out_ranges(m):
        lo, hi = rule.in_window(a, b)
        cols = jac[a:b].nonzero()[:, 1]
        assert lo == int(cols.min()) and hi == int(cols.max()) + 1
        torch.testing.assert_close(jac[a:b, lo:hi] @ x[lo:hi], ref[a:b])


# --------------------------------------------------------------------------------------------
# 5. Output block boundaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "in_bounds", "expected"),
    [
        (ConvAxis(3, 1, 1, 1), [0, 5, 11, 16], [0, 5, 11, 16]),
        (ConvAxis(4, 1, *same_padding(4)), [0, 5, 11, 16], [0, 5, 11, 16]),
        (ConvAxis(5, 1, 4, 4, 2), [0, 3, 6], [0, 3, 6]),
        (ConvAxis(2, 2), [0, 4, 8, 12], [0, 2, 4, 6]),
        (ConvAxis(2, 2, ceil_mode=True), [0, 4, 8, 12], [0, 2, 4, 6]),
        (ConvAxis(3, 2, 1, 1), [0, 8, 16], [0, 4, 8]),
        (ConvAxis(4, 4), [0, 8, 12, 16], [0, 2, 3, 4]),
        (TransposedConvAxis(2, 2), [0, 3, 7, 10], [0, 6, 14, 20]),
        (TransposedConvAxis(3, 2, 1, 1), [0, 3, 7, 10], [0, 6, 14, 20]),
        (TransposedConvAxis(4, 4), [0, 1, 2], [0, 4, 8]),
        (ConvAxis(3), [0, 4, 8, 12], [0, 3, 7, 10]),
        (ConvAxis(3), [0, 5, 9, 13, 17], [0, 4, 8, 12, 15]),
        (ConvAxis(3), [0, 4, 8], [0, 3, 6]),
        (ConvAxis(3), [0, 2, 4], [0, 1, 2]),
    ],
)
def test_out_bounds_examples(rule, in_bounds, expected):
    assert out_bounds(in_bounds, rule) == expected


def _ownership_consistent(rule, in_bounds, bounds) -> bool:
    """Every output lies in the block of the rank owning input ``round(center(j))``."""
    for r, (a, b) in enumerate(itertools.pairwise(bounds)):
        for j in range(a, b):
            c = math.floor(rule.center(j) + Fraction(1, 2))
            owner = sum(c >= cut for cut in in_bounds[1:-1])
            if owner != r:
                return False
    return True


BOUNDS_RULES = [
    ConvAxis(3, 1, 1, 1),
    ConvAxis(3),
    ConvAxis(5),
    ConvAxis(2, 2),
    ConvAxis(3, 2),
    ConvAxis(2, 2, ceil_mode=True),
    ConvAxis(3, 2, 1, 1, ceil_mode=True),
    ConvAxis(3, 2, 1, 1),
    ConvAxis(1, 1, -2, -2),
    TransposedConvAxis(2, 2),
    TransposedConvAxis(3, 2, 1),
    TransposedConvAxis(3, 2, 1, 1),
    TransposedConvAxis(4, 3, 1, 2),
]


def _whole_ratio(n_in: int, n_out: int) -> bool:
    return n_out == n_in or n_in % n_out == 0 or n_out % n_in == 0


@pytest.mark.parametrize("rule", BOUNDS_RULES, ids=repr)
def test_out_bounds_properties(rule):
    checked = 0
    for n, parts, align in itertools.product(range(6, 30), range(1, 5), [1, 2]):
        try:
            in_bounds = split_extent(n, parts, align)
        except DecompositionError:
            continue
        n_out = rule.out_size(n)
        if n_out < 1:
            continue
        bounds = out_bounds(in_bounds, rule)
        assert len(bounds) == len(in_bounds)
        assert bounds[0] == 0 and bounds[-1] == n_out
        assert all(p <= q for p, q in itertools.pairwise(bounds)), (in_bounds, bounds)
        if n_out == n:
            assert bounds == in_bounds
        elif n_out * 2 == n and rule.stride == 2 and all(c % 2 == 0 for c in in_bounds):
            assert bounds == [c // 2 for c in in_bounds]
        elif n_out == 2 * n and rule.stride == 2:
            assert bounds == [2 * c for c in in_bounds]
        if (
            not _whole_ratio(n, n_out) or rule.stride == 1
        ):  # whole ratios deliberately keep blocks aligned
            assert _ownership_consistent(rule, in_bounds, bounds), (in_bounds, bounds)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    ("rule", "in_bounds", "by_center"),
    [
        (ConvAxis(5), [0, 2, 8], [0, 0, 4]),
        (ConvAxis(4), [0, 2, 4, 6], [0, 0, 2, 3]),
        (ConvAxis(1, 1, -2, -2), [0, 3, 6, 8], [0, 1, 4, 4]),  # crop 8 -> 4
    ],
    ids=["valid5", "valid4", "crop"],
)
def test_out_bounds_stride1_rule_with_coincident_ratio_uses_centers(rule, in_bounds, by_center):
    bounds = out_bounds(in_bounds, rule)
    assert _ownership_consistent(rule, in_bounds, by_center)
    assert bounds == by_center


# --------------------------------------------------------------------------------------------
# 6. Halo exchange plans
# --------------------------------------------------------------------------------------------


def _widen(box, before, after=None):
    after = before if after is None else after
    return tuple((lo - before, hi + after) for lo, hi in box)


def _expected_window(image, window, periodic) -> torch.Tensor:
    """The window cut from ``image``: zero padding, or wrap-around on periodic axes."""
    out = image
    for d, ((lo, hi), n, p) in enumerate(zip(window, image.shape, periodic)):
        idx = torch.arange(lo, hi)
        if p:
            out = out.index_select(d, idx % n)
        else:
            valid = ((idx >= 0) & (idx < n)).to(out.dtype)
            out = out.index_select(d, idx.clamp(0, n - 1))
            view = [1] * out.dim()
            view[d] = hi - lo
            out = out * valid.view(view)
    return out


def _simulate(plans, boxes, image, periodic) -> None:
    """Run every rank's exchange on ``image``; check each assembled window against the cut."""
    blocks = [image[_slices(b)] for b in boxes]
    mailbox: dict[tuple[int, int], list] = {}
    for p, plan in enumerate(plans):
        for piece in plan.send:
            assert piece.peer != p
            data = blocks[p][_slices(piece.source)].clone()
            mailbox.setdefault((p, piece.peer), []).append((piece.buffer, data))
    for q, plan in enumerate(plans):
        window = torch.full(plan.shape, math.nan, dtype=image.dtype)
        count = torch.zeros(plan.shape, dtype=torch.int64)
        for piece in plan.recv:
            shape = tuple(hi - lo for lo, hi in piece.buffer)
            assert shape == tuple(hi - lo for lo, hi in piece.source)
            block_shape = blocks[piece.peer].shape
            assert all(0 <= lo < hi <= s for (lo, hi), s in zip(piece.source, block_shape))
            if piece.peer == q:
                data = blocks[q][_slices(piece.source)]
            else:
                buffer, data = mailbox[(piece.peer, q)].pop(0)
                assert buffer == piece.buffer
            assert tuple(data.shape) == shape
            window[_slices(piece.buffer)] = data
            count[_slices(piece.buffer)] += 1
        # the padding: the out-of-image part of the window, filled locally
        in_image = torch.ones(plan.shape, dtype=torch.bool)
        for d, ((before, after), (lo, hi), n) in enumerate(zip(plan.pad, plan.window, image.shape)):
            assert before == (0 if periodic[d] else max(0, -lo))
            assert after == (0 if periodic[d] else max(0, hi - n))
            in_image.narrow(d, 0, before).fill_(False)
            in_image.narrow(d, plan.shape[d] - after, after).fill_(False)
        assert torch.equal(count, in_image.to(torch.int64)), q  # exact tiling, no overlap
        window[~in_image] = 0.0
        torch.testing.assert_close(window, _expected_window(image, plan.window, periodic))
    assert all(not queue for queue in mailbox.values())  # every message was received


def _plans(shape, grid, windows, periodic, with_grid=True):
    boxes = block_boxes(shape, grid)
    return boxes, [
        plan_exchange(r, boxes, windows, shape, periodic, grid if with_grid else None)
        for r in range(len(boxes))
    ]


def _check_mirror(plans) -> None:
    for p, q in itertools.permutations(range(len(plans)), 2):
        sent = [pc for pc in plans[p].send if pc.peer == q]
        received = [pc for pc in plans[q].recv if pc.peer == p]
        assert len(sent) == len(received)
        for s, r in zip(sent, received):
            assert s.buffer == r.buffer
            assert s.source == r.source
            assert box_volume(s.source) == box_volume(r.buffer)


PLAN_CASES = [
    ((7, 9), (2, 2)),
    ((7, 9), (3, 1)),
    ((7, 9), (1, 3)),
    ((6, 4), (3, 2)),
]


@pytest.mark.parametrize(
    "periodic", [(False, False), (True, False), (False, True), (True, True)], ids=str
)
@pytest.mark.parametrize(("shape", "grid"), PLAN_CASES, ids=str)
def test_plan_exchange_same_conv_window(shape, grid, periodic):
    boxes = block_boxes(shape, grid)
    windows = [_widen(b, 1) for b in boxes]
    _, plans = _plans(shape, grid, windows, periodic)
    image = _randn(1, *shape)
    for r, plan in enumerate(plans):
        assert plan.rank == r
        assert plan.window == windows[r] and plan.local_box == boxes[r]
        assert plan.shape == tuple(hi - lo + 2 for lo, hi in boxes[r])
        assert not plan.is_identity and not plan.is_view
    _check_mirror(plans)
    _simulate(plans, boxes, image, periodic)


def test_plan_exchange_corners_and_pads_2x2():
    shape, grid = (7, 9), (2, 2)
    boxes = block_boxes(shape, grid)
    windows = [_widen(b, 1) for b in boxes]
    _, plans = _plans(shape, grid, windows, (False, False))
    # rank 0 owns [0,4)x[0,5): window [-1,5)x[-1,6)
    plan = plans[0]
    assert plan.pad == ((1, 0), (1, 0))
    assert [pc.peer for pc in plan.recv] == [0, 1, 2, 3]
    corner = plan.recv[3]
    assert corner.buffer == ((5, 6), (6, 7)) and corner.source == ((0, 1), (0, 1))
    assert plans[3].pad == ((0, 1), (0, 1))
    assert [pc.peer for pc in plans[3].send] == [0, 1, 2]
    assert box_volume(plans[3].send[0].source) == 1  # the corner for rank 0
    for r, plan in enumerate(plans):
        peers = {pc.peer for pc in plan.recv}
        assert peers == {0, 1, 2, 3}
        diagonal = grid_rank(tuple(1 - c for c in grid_coords(r, grid)), grid)
        corners = [pc for pc in plan.recv if pc.peer == diagonal]
        assert len(corners) == 1 and box_volume(corners[0].buffer) == 1
        assert sum(box_volume(pc.buffer) for pc in plan.recv) == box_volume(
            intersect(plan.window, ((0, 7), (0, 9)))
        )


def test_plan_exchange_periodic_wraps():
    shape, grid = (6, 9), (1, 3)
    boxes = block_boxes(shape, grid)
    windows = [_widen(b, 1) for b in boxes]
    _, plans = _plans(shape, grid, windows, (False, True))
    assert plans[0].pad == ((1, 1), (0, 0))
    peers = [pc.peer for pc in plans[0].recv]
    assert peers == [2, 0, 1]  # column -1 comes from the last block
    assert plans[0].recv[0].buffer == ((1, 7), (0, 1))
    assert plans[0].recv[0].source == ((0, 6), (2, 3))
    assert plans[2].recv[-1].peer == 0 and plans[2].recv[-1].source == ((0, 6), (0, 1))
    # one block along a periodic axis wraps onto itself
    boxes1 = block_boxes(shape, (1, 1))
    windows1 = [_widen(boxes1[0], 2)]
    plan = plan_exchange(0, boxes1, windows1, shape, (True, True), (1, 1))
    assert plan.pad == ((0, 0), (0, 0)) and plan.send == ()
    assert len(plan.recv) == 9 and {pc.peer for pc in plan.recv} == {0}
    assert not plan.is_view
    _simulate([plan], boxes1, _randn(2, *shape), (True, True))


@pytest.mark.parametrize("periodic", [(False, False, False), (False, True, False)], ids=str)
def test_plan_exchange_3d(periodic):
    shape, grid = (5, 6, 4), (2, 2, 2)
    boxes = block_boxes(shape, grid)
    windows = [_widen(b, 1) for b in boxes]
    _, plans = _plans(shape, grid, windows, periodic)
    for plan in plans:
        assert {pc.peer for pc in plan.recv} == set(range(8))
    _check_mirror(plans)
    _simulate(plans, boxes, _randn(3, *shape), periodic)


@pytest.mark.parametrize("periodic", [(False, False), (True, False)], ids=str)
def test_plan_exchange_rule_windows(periodic):
    """Windows built from real rules: asymmetric 'same' padding, stride, valid conv."""
    shape, grid = (12, 10), (3, 2)
    boxes = block_boxes(shape, grid)
    image = _randn(4, *shape)
    rules = [
        ConvAxis(4, 1, *same_padding(4)),
        ConvAxis(3, 2, 1, 1),
        ConvAxis(3),
        ConvAxis(5, 1, 4, 4, 2),
    ]
    for rule in rules:
        bounds = [out_bounds(split_extent(n, g), rule) for n, g in zip(shape, grid)]
        out_boxes = boxes_from_bounds(bounds)
        windows = [tuple(rule.in_window(a, b) for a, b in box) for box in out_boxes]
        _, plans = _plans(shape, grid, windows, periodic)
        _check_mirror(plans)
        _simulate(plans, boxes, image, periodic)


def test_plan_exchange_rejects_far_neighbours():
    shape, grid = (6, 4), (3, 1)  # blocks of 2 rows
    boxes = block_boxes(shape, grid)
    windows = [_widen(b, 3, 3) for b in boxes]
    for rank in (0, 2):
        with pytest.raises(DecompositionError, match=r"2 blocks away along grid axis 0"):
            plan_exchange(rank, boxes, windows, shape, grid=grid)
    with pytest.raises(DecompositionError, match=r"rank 0 needs data from rank 2"):
        plan_exchange(0, boxes, windows, shape, grid=grid)
    # every rank raises, so that no rank waits for a message that never comes
    with pytest.raises(DecompositionError, match=r"rank 0 needs data from rank 2"):
        plan_exchange(1, boxes, windows, shape, grid=grid)
    # without a grid, the plan is still exact
    _, plans = _plans(shape, grid, windows, (False, False), with_grid=False)
    _check_mirror(plans)
    _simulate(plans, boxes, _randn(5, *shape), (False, False))
    # periodic wrap: the last block is a neighbour of the first
    windows1 = [_widen(b, 1) for b in boxes]
    _plans(shape, grid, windows1, (True, False))
    shape5, grid5 = (10, 4), (5, 1)
    boxes5 = block_boxes(shape5, grid5)
    windows5 = [_widen(b, 3, 0) for b in boxes5]
    with pytest.raises(DecompositionError, match=r"rank 0 needs data from rank 3"):
        plan_exchange(0, boxes5, windows5, shape5, (True, False), grid5)


def test_plan_exchange_identity_and_view():
    shape, grid = (8, 9), (2, 3)
    boxes = block_boxes(shape, grid)
    _, plans = _plans(shape, grid, boxes, (False, False))
    for r, plan in enumerate(plans):
        assert plan.is_identity and plan.is_view
        assert plan.send == () and plan.pad == ((0, 0), (0, 0))
        assert len(plan.recv) == 1 and plan.recv[0].peer == r
        assert plan.recv[0].source == tuple((0, hi - lo) for lo, hi in boxes[r])
    # strictly inside (a valid conv): a slice of the block, no message
    inside = [_widen(b, -1) for b in boxes]
    _, plans = _plans(shape, grid, inside, (False, False))
    for r, plan in enumerate(plans):
        assert plan.is_view and not plan.is_identity
        assert plan.send == ()
        assert plan.recv[0].peer == r
        assert plan.recv[0].source == tuple((1, hi - lo - 1) for lo, hi in boxes[r])
    _simulate(plans, boxes, _randn(6, *shape), (False, False))
    # inside on one side only
    one_side = [_widen(b, 0, -1) for b in boxes]
    _, plans = _plans(shape, grid, one_side, (False, False))
    assert all(p.is_view and not p.is_identity for p in plans)
    # widening that only reaches into padding is neither a view nor an identity
    single = block_boxes(shape, (1, 1))
    plan = plan_exchange(0, single, [_widen(single[0], 1)], shape)
    assert plan.send == () and len(plan.recv) == 1
    assert plan.pad == ((1, 1), (1, 1))
    assert not plan.is_view and not plan.is_identity
    # widening into a neighbour is neither
    _, plans = _plans(shape, grid, [_widen(b, 1) for b in boxes], (False, False))
    assert not any(p.is_view or p.is_identity for p in plans)


def test_boundary_bands_cover_the_neighbour_sides_once():
    from haloseg.geometry import boundary_bands

    sizes = (12, 20)
    box = ((4, 10), (0, 8))  # neighbours above, below and to the right; image border left
    bands = boundary_bands(box, sizes, (1, 2))
    cells = {}
    for band in bands:
        for i in range(*band[0]):
            for j in range(*band[1]):
                cells[(i, j)] = cells.get((i, j), 0) + 1
    assert set(cells.values()) == {1}  # disjoint, corners counted once
    expected = {
        (i, j)
        for i in range(4, 10)
        for j in range(0, 8)
        if i in (4, 9) or j in (6, 7)  # one row each side in dim 0, two columns right in dim 1
    }
    assert set(cells) == expected
    assert boundary_bands(((0, 12), (0, 20)), sizes, (1, 1)) == []  # no neighbours
    assert boundary_bands(((4, 6), (0, 8)), sizes, (2, 0)) is None  # thinner than two bands
