"""``haloseg evaluate``: Dice and HD95 equal to MONAI's, regions, ignore label, files, errors."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot

from haloseg.cli.main import main
from haloseg.errors import DataError
from haloseg.evaluation import evaluate, evaluate_case, load_run_settings, write_csv, write_json

# MONAI's own call of a deprecated argument, from the direct MONAI calls here.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

SPACING = (0.9, 0.9, 2.5)
SHAPE = (28, 24, 12)


def _blobs(seed: int, num_classes: int = 4) -> np.ndarray:
    """Smooth random label blobs with every class present."""
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, *SHAPE)))
    smooth = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)[0, 0].numpy()
    edges = np.quantile(smooth, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(smooth, edges).astype(np.uint8)


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    label = _blobs(seed)
    pred = label.copy()
    flip = _blobs(seed + 100, 2).astype(bool) & (np.random.default_rng(seed).random(SHAPE) < 0.3)
    pred[flip] = (pred[flip] + 1) % 4
    return pred, label


def _monai(pred, label, num_classes, spacing):
    """Dice and HD95 per class 1..N-1 from MONAI called on the one-hot label maps."""
    p = one_hot(torch.from_numpy(pred.astype(np.int64))[None, None], num_classes)
    t = one_hot(torch.from_numpy(label.astype(np.int64))[None, None], num_classes)
    metric = DiceMetric(include_background=False, ignore_empty=True, reduction="none")
    metric(p, t)
    dice = metric.aggregate()[0].tolist()
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95,
                                    spacing=list(spacing))[0].tolist()  # fmt: skip
    return dice, hd


def _cli(argv: list[str]) -> int:
    """``haloseg evaluate ...``: bad input is one line and exit 2."""
    return main(["evaluate", *argv])


def _nifti(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), path)


def test_evaluate_case_equals_monai():
    pred, label = _pair(0)
    out = evaluate_case(pred, label, num_classes=4, spacing=SPACING)
    dice, hd = _monai(pred, label, 4, SPACING)
    assert list(out) == [f"dice_class{c}" for c in (1, 2, 3)] + [
        f"hd95_class{c}" for c in (1, 2, 3)
    ]
    np.testing.assert_allclose([out[f"dice_class{c}"] for c in (1, 2, 3)], dice, rtol=1e-6)
    np.testing.assert_allclose([out[f"hd95_class{c}"] for c in (1, 2, 3)], hd, rtol=1e-6)
    assert 0 < min(dice) < 1 and min(hd) > 0


def test_regions_are_unions_of_labels():
    pred, label = _pair(1)
    out = evaluate_case(pred, label, num_classes=4, regions={"WT": [1, 2, 3], "TC": [1, 3]})
    for name, labels in (("WT", [1, 2, 3]), ("TC", [1, 3])):
        dice, hd = _monai(np.isin(pred, labels), np.isin(label, labels), 2, (1.0, 1.0, 1.0))
        assert out[f"dice_{name}"] == pytest.approx(dice[0], rel=1e-6)
        assert out[f"hd95_{name}"] == pytest.approx(hd[0], rel=1e-6)


def test_ignore_label_is_left_out():
    pred, label = _pair(2)
    label[:, :, :3] = 255
    out = evaluate_case(pred, label, num_classes=4, spacing=SPACING, ignore_label=255)
    changed = pred.copy()
    changed[:, :, :3] = 3 - changed[:, :, :3]
    assert evaluate_case(changed, label, num_classes=4, spacing=SPACING, ignore_label=255) == out
    cleared_pred, cleared_label = pred.copy(), label.copy()
    cleared_pred[:, :, :3] = cleared_label[:, :, :3] = 0
    assert evaluate_case(cleared_pred, cleared_label, num_classes=4, spacing=SPACING) == out
    with pytest.raises(DataError, match="--ignore-label 255"):
        evaluate_case(pred, label, num_classes=4)


def test_absent_class_is_nan_and_left_out_of_the_mean(tmp_path):
    (tmp_path / "p").mkdir(), (tmp_path / "l").mkdir()
    pred_a, label_a = _pair(3)
    pred_b, label_b = _pair(4)
    label_b[label_b == 3] = 2
    for name, pred, label in (("a", pred_a, label_a), ("b", pred_b, label_b)):
        np.save(tmp_path / "p" / f"{name}.npy", pred)
        np.save(tmp_path / "l" / f"{name}.npy", label)
    result = evaluate(tmp_path / "p", tmp_path / "l", num_classes=4)
    assert result.units == "voxels"
    assert math.isnan(result.cases["b"]["dice_class3"]) and math.isnan(
        result.cases["b"]["hd95_class3"]
    )
    assert result.mean["dice_class3"] == result.cases["a"]["dice_class3"]
    assert result.mean["hd95_class3"] == result.cases["a"]["hd95_class3"]
    both = [result.cases[c]["dice_class1"] for c in "ab"]
    assert result.mean["dice_class1"] == pytest.approx(np.mean(both))
    # without --num-classes, N is 1 + the largest label value over all label files
    assert list(evaluate(tmp_path / "p", tmp_path / "l").mean) == list(result.mean)


def test_nifti_folder_gives_hd95_in_mm(tmp_path):
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(SPACING)  # column j scaled by the spacing of axis j
    affine[:3, 3] = (10.0, -4.0, 7.0)
    (tmp_path / "p").mkdir(), (tmp_path / "l").mkdir()
    cases = {"BRATS_001": _pair(5), "BRATS_002": _pair(6)}
    for name, (pred, label) in cases.items():
        _nifti(tmp_path / "p" / f"{name}_0000.nii.gz", pred, affine)  # nnU-Net input name
        _nifti(tmp_path / "l" / f"{name}.nii.gz", label, affine)
    (tmp_path / "p" / "preview.png").write_bytes(b"")  # not a case: skipped
    result = evaluate(tmp_path / "p", tmp_path / "l", num_classes=4)
    assert result.units == "mm" and list(result.cases) == list(cases)
    for name, (pred, label) in cases.items():
        dice, hd = _monai(pred, label, 4, SPACING)
        got = result.cases[name]
        np.testing.assert_allclose([got[f"hd95_class{c}"] for c in (1, 2, 3)], hd, rtol=1e-5)
        np.testing.assert_allclose([got[f"dice_class{c}"] for c in (1, 2, 3)], dice, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".npy", ".zarr", ".tif", ".nii.gz"])
def test_every_format_reads_the_same(tmp_path, suffix):
    pred, label = _pair(7)
    paths = []
    for name, array in (("pred", pred), ("label", label)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".npy":
            np.save(path, array)
        elif suffix == ".zarr":
            zarr.create_array(path, data=array)
        elif suffix == ".tif":
            tifffile.imwrite(path, array)
        else:
            _nifti(path, array, np.eye(4))
        paths.append(path)
    result = evaluate(*paths, num_classes=4)
    assert result.cases["label"] == evaluate_case(pred, label, num_classes=4)
    assert result.units == ("mm" if suffix == ".nii.gz" else "voxels")


def test_geotiff_pixel_scale_gives_map_units_and_mismatch_is_an_error(tmp_path):
    pred, label = _pair(8)
    pred, label = pred[:, :, 5], label[:, :, 5]
    metres = (34735, "H", 8, (1, 1, 0, 1, 3076, 0, 1, 9001), True)  # ProjLinearUnits = metre

    def geotiff(path, array, scale, tie):
        tifffile.imwrite(path, array, extratags=[
            (33550, "d", 3, (*scale, 0.0), True), (33922, "d", 6, (0, 0, 0, *tie, 0), True),
            metres])  # fmt: skip

    geotiff(tmp_path / "label.tif", label, (2.0, 3.0), (500000.0, 4e6))
    tifffile.imwrite(tmp_path / "pred.tif", pred)  # haloseg infer writes no geotags
    result = evaluate(tmp_path / "pred.tif", tmp_path / "label.tif", num_classes=4)
    _, hd = _monai(pred, label, 4, (3.0, 2.0))  # rows run along y, scaled by 3
    assert result.units == "m"
    np.testing.assert_allclose([result.cases["label"][f"hd95_class{c}"] for c in (1, 2, 3)],
                               hd, rtol=1e-5)  # fmt: skip
    geotiff(tmp_path / "moved.tif", pred, (2.0, 3.0), (500100.0, 4e6))
    with pytest.raises(DataError, match="moved.tif.*label.tif.*ModelTiepointTag"):
        evaluate(tmp_path / "moved.tif", tmp_path / "label.tif", num_classes=4)


def test_csv_and_json_are_written_and_parse_back(tmp_path, capsys):
    (tmp_path / "p").mkdir(), (tmp_path / "l").mkdir()
    for name, seed in (("a", 9), ("b", 10)):
        pred, label = _pair(seed)
        if name == "a":
            pred[pred == 3] = 2  # a missed structure: Dice 0, HD95 inf
        else:
            label[label == 3] = 2  # no ground truth: NaN
        np.save(tmp_path / "p" / f"{name}.npy", pred)
        np.save(tmp_path / "l" / f"{name}.npy", label)
    result = evaluate(tmp_path / "p", tmp_path / "l", num_classes=4, regions={"WT": [1, 2, 3]})
    write_csv(result, tmp_path / "r.csv")
    write_json(result, tmp_path / "r.json")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b", "mean"]
    assert float(rows[2]["dice_WT"]) == pytest.approx(result.mean["dice_WT"])
    assert math.isnan(float(rows[1]["dice_class3"]))
    assert (rows[0]["dice_class3"], rows[2]["hd95_class3"]) == ("0.0", "inf")
    tree = json.loads((tmp_path / "r.json").read_text())
    assert tree["spacing_units"] == "voxels"
    assert tree["cases"]["a"]["hd95_class1"] == pytest.approx(result.cases["a"]["hd95_class1"])
    assert tree["cases"]["b"]["dice_class3"] is None
    assert tree["cases"]["a"]["hd95_class3"] == tree["mean"]["hd95_class3"] == "inf"
    finite = {k: v for k, v in result.mean.items() if math.isfinite(v)}
    assert {k: tree["mean"][k] for k in finite} == pytest.approx(finite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l", "p", "r.csv", "r.json"]

    argv = [str(tmp_path / "p"), str(tmp_path / "l"), "--num-classes", "4",
            "--regions", "WT=1,2,3", "--csv", str(tmp_path / "c.csv")]  # fmt: skip
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "HD95 WT (voxels)" in out and "mean" in out and "—" in out and "inf" in out
    assert (tmp_path / "c.csv").read_text() == (tmp_path / "r.csv").read_text()


def test_run_folder_settings_and_flags_override(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "data:\n  num_classes: 4\n  regions:\n    WT: [1, 2, 3]\n  ignore_label: 255\n"
    )
    settings = load_run_settings(run)
    assert (settings.num_classes, settings.regions, settings.ignore_label) == (
        4,
        {"WT": [1, 2, 3]},
        255,
    )
    (run / "model.json").write_text(json.dumps(
        {"num_classes": 4, "label_names": ["bg", "edema", "core", "enh"], "regions": {"TC": [1, 3]}}
    ))  # fmt: skip
    settings = load_run_settings(run)
    assert settings.regions == {"TC": [1, 3]} and settings.ignore_label == 255
    pred, label = _pair(11)
    label[0] = 255
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "label.npy", label)
    argv = [str(tmp_path / "pred.npy"), str(tmp_path / "label.npy"), "--run", str(run),
            "--regions", "ET=2,3", "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert _cli(argv) == 0
    assert "Dice edema" in capsys.readouterr().out
    tree = json.loads((tmp_path / "r.json").read_text())
    assert set(tree["mean"]) == {f"{m}_{s}" for m in ("dice", "hd95")
                                 for s in ("class1", "class2", "class3", "ET")}  # fmt: skip
    expected = evaluate_case(pred, label, num_classes=4, regions={"ET": [2, 3]}, ignore_label=255)
    assert tree["mean"] == pytest.approx(expected)
    argv[argv.index("ET=2,3")] = "ET=2"
    assert _cli(argv + ["--num-classes", "3"]) == 2  # label value 3 is now out of range
    assert "pred.npy has values 0..3 but num_classes=3" in capsys.readouterr().err


def _error(argv, capsys) -> str:
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("haloseg: error: ")
    return err


def test_shape_mismatch_names_both_files(tmp_path, capsys):
    pred, label = _pair(12)
    np.save(tmp_path / "pred.npy", pred[:-1])
    np.save(tmp_path / "label.npy", label)
    with pytest.raises(DataError, match=r"pred\.npy has shape \(27, 24, 12\).*label\.npy"):
        evaluate(tmp_path / "pred.npy", tmp_path / "label.npy", num_classes=4)
    assert "pred.npy" in _error([str(tmp_path / "pred.npy"), str(tmp_path / "label.npy")], capsys)


def test_affine_mismatch_names_both_files(tmp_path, capsys):
    pred, label = _pair(13)
    _nifti(tmp_path / "pred.nii.gz", pred, np.eye(4))
    _nifti(tmp_path / "label.nii.gz", label, np.diag([*SPACING, 1.0]))
    with pytest.raises(DataError, match=r"pred\.nii\.gz and label .*label\.nii\.gz .*resample"):
        evaluate(tmp_path / "pred.nii.gz", tmp_path / "label.nii.gz")
    err = _error([str(tmp_path / "pred.nii.gz"), str(tmp_path / "label.nii.gz")], capsys)
    assert "different NIfTI affines" in err


def test_predictions_of_a_subset_are_scored_and_unmatched_ones_named(tmp_path, capsys):
    (tmp_path / "p").mkdir(), (tmp_path / "l").mkdir()
    for name in ("a", "b", "c"):
        pred, label = _pair(14)
        np.save(tmp_path / "l" / f"{name}.npy", label)
        if name == "a":
            np.save(tmp_path / "p" / f"{name}.npy", pred)
    # The validation cases' predictions against the whole labels folder: those are scored.
    assert list(evaluate(tmp_path / "p", tmp_path / "l").cases) == ["a"]
    np.save(tmp_path / "p" / "z.npy", pred)
    err = _error([str(tmp_path / "p"), str(tmp_path / "l")], capsys)
    assert "prediction z.npy (1 in all) has no label" in err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    pred, label = _pair(15)
    np.save(tmp_path / "pred.npy", pred + 1)
    np.save(tmp_path / "label.npy", label)
    (tmp_path / "label.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"pred\.npy has values 1\.\.4 .*--num-classes 5"):
        evaluate(tmp_path / "pred.npy", tmp_path / "label.npy")
    assert "suffixes" in _error([str(tmp_path / "pred.npy"), str(tmp_path / "label.png")], capsys)
    assert "does not exist" in _error([str(tmp_path / "nope.npy"), str(tmp_path / "label.npy")],
                                      capsys)  # fmt: skip
    assert "'mean' is taken" in _error([str(tmp_path / "pred.npy"), str(tmp_path / "label.npy"),
                                 "--num-classes", "5", "--regions", "mean=1"], capsys)  # fmt: skip
