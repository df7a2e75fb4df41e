"""The planner's overlapping tiles against halo exchange: the redundancy E counted voxel by
voxel, the memory of a tile, the choice, and what ``haloseg plan`` and ``haloseg train
--plan`` print."""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import replace

import numpy as np
import pytest

from haloseg.cli.main import main
from haloseg.geometry import split_extent
from haloseg.memory.model import step_memory
from haloseg.memory.planner import unet_spec
from haloseg.memory.tiling import TILES_MAX_REDUNDANCY, compare_tiling, tile_spec, tiles


def _counted(image: tuple[int, ...], grid: tuple[int, ...], align: int, halo: tuple[int, ...]):
    """(largest tile, E) by painting every tile into a voxel count of the padded image."""
    padded = [max(math.ceil(n / align), g) * align for n, g in zip(image, grid)]
    counts = np.zeros(padded, dtype=np.int64)
    bounds = [split_extent(n, g, align) for n, g in zip(padded, grid)]
    largest = (0,) * len(image)
    for cell in np.ndindex(*grid):
        box = [(max(0, b[c] - h), min(n, b[c + 1] + h))
               for b, c, h, n in zip(bounds, cell, halo, padded)]  # fmt: skip
        counts[tuple(slice(lo, hi) for lo, hi in box)] += 1
        shape = tuple(hi - lo for lo, hi in box)
        largest = max(largest, shape, key=math.prod)
    assert counts.min() >= 1  # the tiles cover the image
    return largest, counts.sum() / counts.size


@pytest.mark.parametrize(
    ("image", "grid", "align", "halo"),
    [((100, 84), (2, 3), 4, (8, 12)), ((37, 50, 29), (1, 2, 2), 2, (6, 6, 6)),
     ((64, 64), (4, 4), 16, (48, 48))],
)  # fmt: skip
def test_redundancy_counts_every_voxel_of_every_tile(image, grid, align, halo):
    tile, e = tiles(image, grid, align, halo)
    want_tile, want_e = _counted(image, grid, align, halo)
    assert math.prod(tile) == math.prod(want_tile)
    assert e == pytest.approx(want_e, rel=1e-12)


def test_summit_scene_redundancy():
    """10,000² as 8x8 tiles of about 1250² with Summit's halo of 92: halos cut at the border
    make E smaller than ((1250 + 184) / 1250)² for every tile."""
    tile, e = tiles((10000, 10000), (8, 8), 16, (92, 92))
    # Cores of 1264 (the first) and 1248 (aligned to 16); per axis the tiles are
    # 1264 + 92, six of 1248 + 2 x 92, and 1248 + 92.
    per_axis = (1264 + 92 + 6 * (1248 + 184) + 1248 + 92) / 10000
    assert tile == (1248 + 184, 1248 + 184)
    assert e == pytest.approx(per_axis**2, rel=1e-12)
    assert e == pytest.approx(_counted((10000, 10000), (8, 8), 16, (92, 92))[1], rel=1e-12)
    assert e < ((1250 + 184) / 1250) ** 2


def _spec(**kw):
    return unet_spec(image=(2048, 2048), in_channels=1, classes=2, channels=8, depth=4,
                     norm="none", **kw)  # fmt: skip


def test_tiles_memory_is_the_plain_step_on_the_largest_tile():
    spec = _spec()
    (row,) = compare_tiling(spec, (112, 112), [4])
    assert row.grid == (2, 2) and row.tile == (1024 + 112, 1024 + 112)
    assert row.tiles.peak == step_memory(replace(spec, image=row.tile, grid=None)).peak
    assert row.tiles.peak == step_memory(tile_spec(spec, row.tile)).peak
    assert row.halo.peak == step_memory(replace(spec, grid=(2, 2))).peak
    assert row.halo.peak < row.tiles.peak  # a tile is its block and more


def test_choice_follows_locality_redundancy_and_fit():
    spec = _spec()
    rows = compare_tiling(spec, (112, 112), [4, 64])
    small, large = rows
    assert small.redundancy <= TILES_MAX_REDUNDANCY < large.redundancy
    assert small.choice == "tiles" and large.choice == "halo"
    assert large.reason == f"tiles would compute {large.redundancy:.2f}x the image's voxels"
    (nonlocal_,) = compare_tiling(spec, (112, 112), [4], nonlocal_reason="GroupNorm")
    assert nonlocal_.choice == "halo" and nonlocal_.reason == "GroupNorm"
    budget = int((small.halo.peak + small.tiles.peak) / 2 / 0.9)  # halo fits, the tile not
    (tight,) = compare_tiling(spec, (112, 112), [4], device_memory=budget)
    assert tight.choice == "halo" and "does not fit" in tight.reason


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_plan_command_compares_tiles_with_halo_exchange():
    code, out = _cli("plan", "--image", "2048x2048", "--channels", "8", "--norm", "none",
                     "--devices", "4", "--top", "1")  # fmt: skip
    assert code == 0
    assert "overlapping tiles (halo 112x112 per side" in out
    assert "1136x1136" in out and "at 4 devices: overlapping tiles" in out


def test_plan_command_takes_another_redundancy_limit():
    argv = ["plan", "--image", "2048x2048", "--norm", "none", "--devices", "64", "--top", "1"]
    assert "at 64 devices: halo exchange" in _cli(*argv)[1]
    assert "at 64 devices: overlapping tiles" in _cli(*argv, "--max-redundancy", "3.5")[1]
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["plan", "--image", "64x64", "--max-redundancy", "0.5"])
    assert e.value.code == 2 and "'0.5' is not a redundancy E >= 1" in err.getvalue()


def test_plan_command_keeps_halo_exchange_for_image_statistics():
    code, out = _cli("plan", "--image", "2048x2048", "--norm", "instance", "--top", "1")
    assert code == 0
    assert "halo exchange: parallel.mode=tiles" in " ".join(out.split())
    assert "InstanceNorm normalises" in " ".join(out.split())
    code, out = _cli("plan", "--image", "2048x2048", "--norm", "batch", "--freeze-norm",
                     "--devices", "4", "--top", "1")  # fmt: skip
    assert code == 0 and "at 4 devices: overlapping tiles" in out


def test_train_plan_in_tiles_mode_prices_the_tile(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    base = ["train", str(config), "data.shape=[512, 512]", "model.norm=none",
            "parallel.grid=[2,2]", "--plan"]  # fmt: skip
    code, halo = _cli(*base)
    code_tiles, tiled = _cli(*base[:-1], "parallel.mode=tiles", "--plan")
    assert code == code_tiles == 0
    assert "tiles mode: each of the 4 processes of an image trains on a tile of at most " \
           "368x368 (halo 112x112 per side)" in " ".join(tiled.split())  # fmt: skip
    assert "block 256x256" in halo and "block 368x368" in tiled
