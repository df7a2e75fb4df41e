"""Blocks with named skips, and the automatic balance of pipeline stages."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch
from torch import nn

from _user_path import cli
from haloseg.errors import ConfigError
from haloseg.models.unet import UNet
from haloseg.pipeline import Block, SkipSequence, unet_blocks
from haloseg.pipeline.balance import (
    BlockCost,
    even_split,
    measure_blocks,
    partition,
    plan_stages,
    probe_scale,
)


@pytest.mark.parametrize(
    "kw, size",
    [({"norm": "batch"}, 32), ({"norm": "none", "upsampling": "linear"}, 32),
     ({"norm": "group", "upsampling": "nearest"}, 32),
     ({"norm": "instance", "padding": "valid", "convs_per_level": 1}, 30)],
)  # fmt: skip
@pytest.mark.parametrize("dims", [2, 3])
def test_unet_blocks_equal_the_unet(kw: dict, size: int, dims: int) -> None:
    size = size if dims == 2 else size // 2 + 4
    torch.manual_seed(0)
    unet = UNet(spatial_dims=dims, in_channels=2, out_channels=3, depth=2, base_channels=4,
                **kw).double()  # fmt: skip
    while kw.get("padding") == "valid" and not _fits(unet, size):
        size += 1
    seq = unet_blocks(unet)
    x = torch.randn(2, 2, *(size,) * dims, dtype=torch.float64)
    ref = unet(x)
    unet.zero_grad()
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    out = seq(x)
    out.square().sum().backward()
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(unet.parameters(), grads, strict=True))
    # One block per convolution unit, pool, up-sampling, plus the head.
    convs = 2 * (unet.depth + 1) + 2 * unet.depth
    units = convs * unet.convs_per_level // 2
    assert len(seq) == units + 2 * unet.depth + 1
    assert {id(p) for p in seq.parameters()} == {id(p) for p in unet.parameters()}


def _fits(unet: UNet, size: int) -> bool:
    try:
        return unet.output_size(size) > 0
    except ConfigError:
        return False


def test_live_skips_are_those_crossing_a_cut() -> None:
    seq = unet_blocks(UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2,
                           base_channels=4, convs_per_level=1))  # fmt: skip
    names = [b.name for b in seq.specs]
    assert names == ["encoder.0.0", "pools.0", "encoder.1.0", "pools.1", "encoder.2.0",
                     "ups.0", "decoder.0.0", "ups.1", "decoder.1.0", "head"]  # fmt: skip
    assert seq.live(0) == ()
    assert seq.live(1) == ("skip0",)
    assert seq.live(3) == ("skip0", "skip1")
    assert seq.live(6) == ("skip0", "skip1")  # decoder.0.0 takes skip1: still crossing
    assert seq.live(7) == ("skip0",)
    assert seq.live(9) == ()


def test_skip_sequence_refuses_inconsistent_skips() -> None:
    conv = nn.Identity()
    with pytest.raises(ConfigError, match="'a', which is not saved by an earlier block"):
        SkipSequence([Block("x", conv, takes=("a",))])
    with pytest.raises(ConfigError, match="taken twice"):
        SkipSequence([Block("x", conv, saves="a"), Block("y", _Add(), takes=("a",)),
                      Block("z", _Add(), takes=("a",))])  # fmt: skip
    with pytest.raises(ConfigError, match="saved but no block takes them"):
        SkipSequence([Block("x", conv, saves="a"), Block("y", conv)])


class _Add(nn.Module):
    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip


def _costs(seconds: list[float], saved: list[int] | None = None) -> list[BlockCost]:
    saved = saved or [1] * len(seconds)
    return [BlockCost(f"b{i}", s, m, 1, 0) for i, (s, m) in enumerate(zip(seconds, saved))]


def _brute(seconds: list[float], stages: int) -> float:
    n = len(seconds)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(seconds[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_partition_minimises_the_slowest_stage(seed: int) -> None:
    rng = random.Random(seed)
    seconds = [rng.uniform(0.1, 3.0) for _ in range(rng.randint(5, 11))]
    stages = rng.randint(2, 4)
    sizes = partition(_costs(seconds), stages)
    assert len(sizes) == stages and sum(sizes) == len(seconds) and min(sizes) >= 1
    got = max(plan_stages(_costs(seconds), sizes).seconds)
    assert got == pytest.approx(_brute(seconds, stages), rel=1e-12)


def test_partition_respects_the_memory_cap() -> None:
    # Even time, but the first blocks hold much memory: a cap forces a short first stage.
    costs = _costs([1.0] * 8, saved=[100, 100, 100, 1, 1, 1, 1, 1])
    free = partition(costs, 2)
    assert free == [4, 4]
    capped = partition(costs, 2, memory_cap=250)
    assert capped[0] <= 2
    assert max(plan_stages(costs, capped).memory) <= 250
    with pytest.raises(ConfigError, match="no split into 2 stages fits a memory cap of 50"):
        partition(costs, 2, memory_cap=50)


def test_gpipe_holds_every_micro_batch_and_1f1b_fewer() -> None:
    costs = _costs([1.0] * 4, saved=[10] * 4)
    gpipe = plan_stages(costs, [2, 2], microbatches=8, schedule="gpipe")
    one = plan_stages(costs, [2, 2], microbatches=8, schedule="1f1b")
    assert gpipe.memory == (8 * (20 + 1), 8 * (20 + 1))
    assert one.memory == (2 * (20 + 1), 1 * (20 + 1))
    # Equal stages: bubble (S - 1) / (M + S - 1).
    assert one.bubble == pytest.approx(1 / 9)
    assert one.speedup == pytest.approx(16 / 9)


def test_more_stages_than_blocks_is_refused() -> None:
    with pytest.raises(ConfigError, match="parallel.pipeline=5 stages but the network has only 3"):
        partition(_costs([1.0, 1.0, 1.0]), 5)


def test_even_split() -> None:
    assert even_split(10, 4) == [3, 3, 2, 2]
    assert probe_scale((1024, 1024), 32) == ((256, 256), 16.0)


def test_measure_blocks_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=4)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    costs = measure_blocks(unet_blocks(unet), torch.empty(2, 1, 32, 32), repeats=1, align=4)
    assert [c.name for c in costs][:2] == ["encoder.0.0", "encoder.0.1"]
    assert all(c.seconds > 0 and c.saved_bytes > 0 for c in costs[:3])
    # The first unit saves at least its input (2x1x32x32 fp32) for the convolution's backward.
    assert costs[0].saved_bytes >= 2 * 32 * 32 * 4
    assert costs[0].param_bytes == sum(p.numel() * 4 for p in unet.encoder[0][:3].parameters())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in unet.parameters())


def test_plan_pipeline_prints_the_balance() -> None:
    code, out, _ = cli("plan", "--image", "64x64", "--channels", "4", "--depth", "2",
                        "--batch", "4", "--pipeline", "3", "--schedule", "gpipe")  # fmt: skip
    assert code == 0, out
    assert "3 pipeline stages" in out and "bubble" in out
    balance = re.search(r"parallel.balance=\[(\d+), (\d+), (\d+)\]", out)
    assert balance is not None and sum(map(int, balance.groups())) == 15


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--pipeline", "16"], "parallel.pipeline=16 stages but the network has only 15 blocks"),
     (["--pipeline", "2", "--microbatches", "3"], "divides --batch"),
     (["--pipeline", "2", "--memory-cap", "1KB"], "no split into 2 stages fits")],
)  # fmt: skip
def test_plan_pipeline_refuses_bad_input(argv: list[str], message: str) -> None:
    code, _, err = cli("plan", "--image", "64x64", "--channels", "4", "--depth", "2",
                        "--batch", "4", *argv)  # fmt: skip
    assert code == 2
    assert message in " ".join(err.split())


def test_train_plan_with_a_pipeline_prints_the_stages(tmp_path) -> None:  # noqa: ANN001
    code, out, err = cli("train", "configs/ellipses-2d.yaml", f"output_dir={tmp_path}/run",
                          "parallel.grid=null", "parallel.pipeline=2", "train.batch_size=2",
                          "parallel.microbatches=2", "data.shape=[64,64]", "--plan")  # fmt: skip
    assert code == 0, err
    assert "2 pipeline stages" in out and "balanced split" in out
    assert not (tmp_path / "run").exists()
    code, _, err = cli("train", "configs/ellipses-2d.yaml", "parallel.grid=null",
                        "parallel.pipeline=2", "parallel.balance=[3,3]", "data.shape=[64,64]",
                        "train.batch_size=2", "--plan")  # fmt: skip
    assert code == 2 and "parallel.balance=[3, 3] gives 6 blocks" in " ".join(err.split())


def test_bench_pipeline_refuses_bad_input() -> None:
    code, _, err = cli("bench", "pipeline", "--scenario", "9d")
    assert code == 2 and "scenario '9d' is not one of" in err
    code, _, err = cli("bench", "pipeline", "--stages", "1")
    assert code == 2 and "give stage counts >= 2" in " ".join(err.split())
