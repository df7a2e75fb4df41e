"""``haloseg bench accuracy``: the patch sampler, sliding-window inference, equal budgets,
the outputs and the command line, and a tiny study end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from haloseg.bench import accuracy_report as report
from haloseg.bench.accuracy import AccuracyConfig, arms, run_study, run_whole
from haloseg.bench.accuracy_train import (
    FOREGROUND_SHARE,
    PatchSampler,
    dice_per_class,
    predict_windows,
)
from haloseg.cli import bench_accuracy
from haloseg.cli.main import _parser, main
from haloseg.errors import ConfigError
from haloseg.models import unet_preset

TINY = ["--tasks", "control", "--size", "32", "--depth", "2", "--steps", "4", "--seeds", "1",
        "--train-images", "3", "--test-images", "2", "--threads", "1"]  # fmt: skip
"""A study of seconds; one seed, since each seed starts 4 processes for the 2x2 grid."""


def _labels() -> np.ndarray:
    """8 images 64x64: class 1 a single voxel, class 2 a large square far from it."""
    labels = np.zeros((8, 64, 64), dtype=np.int64)
    labels[:, 5, 5] = 1
    labels[:, 30:60, 30:60] = 2
    return labels


def test_sampler_oversamples_foreground_as_nnunet() -> None:
    labels = _labels()
    patches = PatchSampler(labels, (1, 2), np.random.default_rng(0)).sample(16, 3000)
    forced = [p for p in patches if p.foreground]
    assert len(forced) / len(patches) == pytest.approx(FOREGROUND_SHARE, abs=0.03)
    for p in patches:
        assert all(0 <= lo and hi - lo == 16 and hi <= 64 for lo, hi in p.box)
    cut = [labels[p.image][tuple(slice(*b) for b in p.box)] for p in forced]
    assert all((c > 0).any() for c in cut)
    # A class is drawn first, then one of its voxels: the one-voxel class gets half of them.
    assert np.mean([(c == 1).any() for c in cut]) == pytest.approx(0.5, abs=0.06)
    uniform = np.array([p.box[0][0] for p in patches if not p.foreground])
    assert uniform.min() == 0 and uniform.max() == 48


def test_sampler_without_foreground_samples_uniformly() -> None:
    labels = np.zeros((2, 32, 32), dtype=np.int64)
    patches = PatchSampler(labels, (1, 2), np.random.default_rng(0)).sample(8, 50)
    assert not any(p.foreground for p in patches)


def test_sliding_window_as_large_as_the_image_is_the_model() -> None:
    torch.manual_seed(0)
    model = unet_preset("small", spatial_dims=2, in_channels=1, out_channels=3, depth=2).eval()
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = model(image)
    torch.testing.assert_close(predict_windows(model, image, 32, 1), expected)
    assert predict_windows(model, image, 16, 4).shape == expected.shape


def test_dice_per_class() -> None:
    pred = np.array([[1, 1, 0], [0, 2, 0]])
    label = np.array([[1, 0, 0], [0, 2, 2]])
    d1, d2, d3 = dice_per_class(pred, label, (1, 2, 3))
    assert d1 == pytest.approx(2 / 3) and d2 == pytest.approx(2 / 3) and np.isnan(d3)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"steps": 100}, {"spatial_dims": 3, "size": 64, "steps": 31},
     {"size": 256, "patch_fractions": (0.125, 0.25, 0.5)}],
)  # fmt: skip
def test_every_arm_sees_the_same_voxels(kwargs: dict) -> None:
    cfg = AccuracyConfig(**kwargs)
    budget = cfg.steps * cfg.size**cfg.spatial_dims
    study = arms(cfg)
    assert [a.kind for a in study] == ["patch"] * len(cfg.patch_sides) + ["progressive", "whole"]
    for arm in study:
        assert arm.voxels_seen(cfg.spatial_dims) == budget
        assert sum(s.steps for s in arm.stages) == cfg.steps
        # Every step holds one image's worth of voxels, however it is cut.
        assert {s.side**cfg.spatial_dims * s.batch for s in arm.stages} == {budget // cfg.steps}
    grown = next(a for a in study if a.kind == "progressive")
    assert [s.side for s in grown.stages] == [*cfg.patch_sides, cfg.size]


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 100}, {"patch_fractions": (0.3,)}, {"patch_fractions": (1.0,)},
     {"whole_grid": (2, 2, 1)}, {"tasks": ("shape",)}, {"tasks": ()}, {"seeds": 0},
     {"size": 16, "depth": 2}, {"whole_grid": (16, 1)}],
)  # fmt: skip
def test_config_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AccuracyConfig(**kwargs)


def test_cli_defaults_are_the_config_defaults() -> None:
    args = _parser().parse_args(["bench", "accuracy"])
    assert bench_accuracy._config(args) == AccuracyConfig()


@pytest.mark.parametrize(
    "flags",
    [["--size", "100"], ["--whole-grid", "2by2"], ["--tasks", "shape"], ["--steps", "0"],
     ["--patch-fractions", "0.3"], ["--json", "/no/such/folder/out.json"]],
)  # fmt: skip
def test_cli_bad_flags_exit_2_with_one_line(flags: list[str], capsys) -> None:
    assert main(["bench", "accuracy", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("haloseg: error: ") and err.count("\n") == 1


def test_json_and_png_are_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    cfg = AccuracyConfig(tasks=("control",), size=32, depth=2, seeds=1, steps=1)
    run = {"task": "control", "seed": 0, "dice": [0.5, 0.7], "train_s": 1.0, "final_loss": 1.0}
    records = [{**run, "arm": a.name, "kind": a.kind} for a in arms(cfg)]
    rows = report.summarise(records, cfg)
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    out.write_text("old")
    png.write_bytes(b"old")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse)
        with pytest.raises(OSError):
            report.write_json(out, cfg, rows, report.compare(rows), records, "haloseg test")
        with pytest.raises(OSError):
            report.plot(rows, png, cfg.size)
    assert out.read_text() == "old" and png.read_bytes() == b"old"
    report.write_json(out, cfg, rows, report.compare(rows), records, "haloseg test")
    report.plot(rows, png, cfg.size)
    assert json.loads(out.read_text())["rows"] == rows
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_tiny_study_end_to_end(tmp_path, capsys) -> None:
    """The command with its default 2x2 whole-image grid; the grid's numbers equal one
    process's (the engine is exact)."""
    out, png = tmp_path / "acc.json", tmp_path / "acc.png"
    assert main(["bench", "accuracy", *TINY, "--json", str(out), "--plot", str(png)]) == 0
    assert "whole − best" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["whole_grid"] == [2, 2]
    rows = result["rows"]
    assert [r["arm"] for r in rows] == ["patch 8", "patch 16", "progressive", "whole"]
    assert len({r["voxels_seen"] for r in rows}) == 1
    assert all(0 <= v <= 1 for r in rows for k in ("class1", "class2")
               for v in r["dice"][k]["seeds"])  # fmt: skip
    assert result["comparison"][0]["task"] == "control"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.json", "acc.png"]
    (grid,) = [r for r in result["runs"] if r["arm"] == "whole"]
    cfg = bench_accuracy._config(_parser().parse_args(["bench", "accuracy", *TINY]))
    one = run_whole(AccuracyConfig(**{**vars(cfg), "whole_grid": (1, 1)}), "control", 0)
    assert grid["loss_window"] == 1 and len(grid["loss_curve"]) == 4
    np.testing.assert_allclose(grid["loss_curve"], one["loss_curve"], rtol=1e-4)


def test_study_reports_every_arm_with_its_spread_over_seeds() -> None:
    cfg = AccuracyConfig(
        tasks=("size",), size=32, depth=2, seeds=2, steps=2, train_images=2, test_images=1,
        whole_grid=(1, 1), progressive=False, threads=1,
    )  # fmt: skip
    seen = []
    records = run_study(cfg, progress=lambda done, total, r: seen.append((done, total)))
    assert [(r["seed"], r["arm"]) for r in records] == [
        (s, a) for s in (0, 1) for a in ("patch 8", "patch 16", "whole")]  # fmt: skip
    assert seen == [(i, 6) for i in range(1, 7)]
    rows = report.summarise(records, cfg)
    for r in rows:
        seeds = r["dice"]["mean"]["seeds"]
        assert len(seeds) == 2 and r["dice"]["mean"]["std"] == pytest.approx(np.std(seeds, ddof=1))
    (c,) = report.compare(rows)
    best = next(r for r in rows if r["arm"] == c["best_patch"])
    whole = next(r for r in rows if r["arm"] == "whole")
    assert c["whole_minus_best_patch"]["mean"]["mean"] == pytest.approx(
        whole["dice"]["mean"]["mean"] - best["dice"]["mean"]["mean"])  # fmt: skip
