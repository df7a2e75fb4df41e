"""The memory model against measured steps, the planner, and ``haloseg plan`` / ``--plan``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from _user_path import cli
from haloseg.bench.memory import Calibration, measure
from haloseg.memory.model import step_memory
from haloseg.memory.planner import HEADROOM, balanced_grid, plan, tiled_redundancy, unet_spec

# Small enough for a second each; the full calibration is `haloseg bench memory`.
CASES = [
    Calibration("2d batch", (128, 128), depth=3, batch=2),
    Calibration(
        "2d group linear ckpt",
        (128, 128),
        depth=3,
        norm="group",
        upsampling="linear",
        checkpoint=True,
    ),  # fmt: skip
    Calibration("3d instance", (32, 32, 32), depth=3, norm="instance"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_prediction_within_15_percent_of_the_measured_step(case: Calibration) -> None:
    predicted = step_memory(case.spec()).peak
    measured = measure(case)
    assert 0.85 <= predicted / measured <= 1.15, (predicted, measured)


def _spec(**kw: object) -> object:
    return unet_spec(image=(256, 256, 256), in_channels=1, classes=3, channels=16, depth=4, **kw)


def test_memory_savers_and_grids_lower_the_prediction() -> None:
    base = _spec()
    plain = step_memory(base).peak
    assert step_memory(replace(base, checkpoint=True)).peak < 0.8 * plain
    assert step_memory(replace(base, swap="all")).peak < 0.6 * plain
    skips = step_memory(replace(base, swap="skips"))
    assert 0 < skips.swapped < step_memory(replace(base, swap="all")).swapped
    # A budget as large as everything swaps nothing; a zero budget swaps like "all".
    assert step_memory(replace(base, swap="budget", swap_budget=plain)).swapped == 0
    assert (
        step_memory(replace(base, swap="budget", swap_budget=0)).swapped
        == step_memory(replace(base, swap="all")).swapped
    )
    quarter = step_memory(replace(base, grid=(1, 2, 2)))
    assert quarter.activations < 0.3 * step_memory(base).activations
    assert quarter.halos > 0


def test_plan_picks_the_fewest_devices_that_fit() -> None:
    spec = _spec()
    need = step_memory(spec).peak
    rows = plan(spec, int(need / HEADROOM * 1.01))
    assert rows[0].fits and rows[0].mix.devices == 1 and rows[0].mix.swap == "none"
    # Within 1% of the device is too close: the plan keeps HEADROOM for workspaces.
    tight = plan(spec, int(need * 1.01))[0]
    assert (tight.mix.devices, tight.mix.swap, tight.mix.checkpoint) != (1, "none", False)
    rows = plan(spec, int(need * 0.3))
    best = rows[0]
    assert best.fits and best.memory.peak <= HEADROOM * need * 0.3
    assert all(not r.fits or r.mix.devices >= best.mix.devices for r in rows)
    assert not plan(spec, 1 << 20, max_devices=2)[0].fits


def test_balanced_grid_and_tiled_redundancy() -> None:
    assert balanced_grid((1024, 512, 512), 4, 16) == (2, 2, 1)
    assert balanced_grid((64, 64), 64, 16) is None
    assert tiled_redundancy((100, 100), (50, 50)) == pytest.approx(4.0)


def test_plan_command_prints_the_cheapest_mix_and_draws(tmp_path: Path) -> None:
    code, out, _ = cli(
        "plan", "--image", "512x512x512", "--in-channels", "4", "--channels", "32", "--depth",
        "4", "--device-memory", "80GB", "--dtype", "bf16", "--json", str(tmp_path / "p.json"),
        "--plot", str(tmp_path / "figs"),
    )  # fmt: skip
    assert code == 0
    assert "cheapest that fits" in out and "overlapping tiles (halo 112x112x112" in out
    rows = json.loads((tmp_path / "p.json").read_text())
    assert rows[0]["fits"] and rows[0]["peak"] <= 80e9
    for name in ("memory-vs-size.png", "memory-vs-channels.png", "devices-needed.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "512x"], "512x"),
        (["--image", "64x64", "--depth", "7"], "2**depth"),
        (["--image", "64x64", "--device-memory", "lots"], "lots"),
        (["--image", "64x64", "--channels", "0"], "--channels=0"),
        (["--image", "64x64", "--device-memory", "inf"], "'inf'"),
        (["--image", "64x64", "--json", "/missing/dir/p.json"], "cannot write"),
    ],
)
def test_plan_command_refuses_bad_input(argv: list[str], message: str) -> None:
    code, _, err = cli("plan", *argv)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.grid=[2,2,2]"], "one extent per spatial dim"),
        (["memory.swap=all", "memory.swap_budget=1GB"], "memory.swap=budget only"),
        (["memory.device_memory=-1GB"], "'-1GB'"),
    ],
)
def test_train_plan_refuses_bad_input(overrides: list[str], message: str) -> None:
    code, _, err = cli("train", "configs/ellipses-2d.yaml", *overrides, "--plan")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_train_plan_prints_the_prediction_and_trains_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, _ = cli(
        "train", "configs/ellipses-2d.yaml", f"output_dir={run}", "memory.checkpoint=true",
        "memory.device_memory=1GB", "--plan",
    )  # fmt: skip
    assert code == 0
    assert "predicted peak memory" in out and "fits in" in out
    assert not run.exists()
