"""``haloseg demo`` writes its run folder; the full demo reaches Dice >= 0.9 (slow)."""

from __future__ import annotations

import json

import pytest

from haloseg.cli.main import main


def _check_outputs(folder, capsys) -> dict:
    out = capsys.readouterr().out
    for name in ("metrics.json", "overlays.png", "curve.png", "comparison.md", "config.yaml"):
        assert (folder / name).is_file(), name
    assert (folder / "checkpoints" / "latest.json").is_file()
    assert any((folder / "tensorboard").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = metrics["comparison"]
    assert [r["rank"] for r in rows] == [0, 0, 1, 2, 3]
    assert all(r["step_s"] > 0 and r["step_peak_mib"] > 0 for r in rows)
    assert str(folder) in out
    return metrics


def test_short_demo_writes_its_run_folder(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--size", "64", "--output", str(folder)]) == 0
    metrics = _check_outputs(folder, capsys)
    assert metrics["steps"] == 3 and metrics["grid"] == [2, 2]


@pytest.mark.slow
def test_demo_reaches_dice_090(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--output", str(folder)]) == 0
    assert _check_outputs(folder, capsys)["dice_mean"] >= 0.9
