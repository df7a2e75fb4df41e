"""The user's whole path on data that looks real: prepare data -> haloseg train -> haloseg
infer on the validation files -> haloseg evaluate. The inferred Dice equals the run's
validation Dice, and every prediction carries its input's geometry (NIfTI affine, GeoTIFF
georeference)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import tifffile

from _user_path import CONFIGS
from haloseg.cli.main import main

GEOKEYS = (33550, 33922, 34264, 34735, 34736, 34737)


def _run(*argv: str) -> None:
    assert main([*argv]) == 0, argv


def _validation_files(folder, names, into):
    """The validation images (the run's last ones) gathered in a folder of their own."""
    into.mkdir()
    for name in names:
        os.symlink(folder / name, into / name)
    return into


def _same_dice(evaluation, run, keys):
    metrics = json.loads((run / "metrics.json").read_text())
    mean = json.loads(evaluation.read_text())["mean"]
    for key in keys:
        assert mean[f"dice_{key}"] == pytest.approx(metrics[f"dice_{key}"], abs=0.01), key
    return metrics


# CI trains briefly (the path's equalities hold at any step); the slow runs train a few
# hundred steps and check that the model has learnt, so the Dice compared is a real one.
STEPS = [30, pytest.param(300, marks=pytest.mark.slow)]


@pytest.mark.parametrize("steps", STEPS)
def test_decathlon_volumes_with_scanner_intensities_and_an_affine(steps, tmp_path, capsys):
    data, run = tmp_path / "Task01", tmp_path / "run"
    _run("data", "synth", str(data), "--format", "msd", "--shape", "32", "32", "16",
         "--num-images", "8", "--in-channels", "2", "--num-classes", "4", "--scanner")  # fmt: skip
    _run("train", str(CONFIGS / "msd-brain-tumour.yaml"), f"data.path={data}",
         f"output_dir={run}", "device=cpu", "model.preset=small", "model.norm=batch",
         "model.depth=2", "model.base_channels=8", "parallel.grid=null", "parallel.data=1",
         "train.amp=false", f"train.steps={steps}", f"train.val_every={steps}",
         "train.warmup_steps=10", "train.lr=1e-2", f"train.checkpoint_every={steps}",
         "--no-progress")  # fmt: skip
    images = data / "imagesTr"
    val = _validation_files(images, ["case_006.nii.gz", "case_007.nii.gz"], tmp_path / "val")
    preds = tmp_path / "preds"
    preds.mkdir()
    # Small tiles: several per volume, and the statistics pass reads several chunks.
    _run("infer", "--checkpoint", str(run), "--input", str(val), "--output", str(preds),
         "--tile", "16", "--no-progress")  # fmt: skip
    assert "zscore_nonzero normalised" in capsys.readouterr().out
    evaluation = tmp_path / "eval.json"
    _run("evaluate", str(preds), str(data / "labelsTr"), "--run", str(run),
         "--json", str(evaluation), "--csv", str(tmp_path / "eval.csv"))  # fmt: skip
    metrics = _same_dice(evaluation, run, ["class1", "class2", "class3", "whole_tumour"])
    if steps >= 300:
        assert metrics["dice_whole_tumour"] > 0.5  # it learnt: the Dice compared is a real one
    for name in ("case_006.nii.gz", "case_007.nii.gz"):
        pred, image = nib.load(preds / name), nib.load(images / name)
        np.testing.assert_array_equal(pred.affine, image.affine)
        for form in ("get_qform", "get_sform"):
            got, code = getattr(pred, form)(coded=True)
            want, want_code = getattr(image, form)(coded=True)
            np.testing.assert_allclose(got, want, atol=1e-6)
            assert code == want_code
        assert pred.header.get_zooms() == image.header.get_zooms()[:3]
    # A rerun skips the finished cases.
    _run("infer", "--checkpoint", str(run), "--input", str(val), "--output", str(preds),
         "--tile", "16", "--no-progress")  # fmt: skip
    assert capsys.readouterr().out.count("exists, skipped") == 2


@pytest.mark.parametrize("steps", STEPS)
def test_georeferenced_scenes_with_a_groupnorm_model(steps, tmp_path, capsys):
    data, run = tmp_path / "scenes", tmp_path / "run"
    _run("data", "synth", str(data), "--format", "tiff", "--shape", "64", "64",
         "--num-images", "10", "--in-channels", "4", "--num-classes", "3", "--scanner")  # fmt: skip
    _run("train", str(CONFIGS / "satellite-4band.yaml"), f"data.path={data}",
         f"output_dir={run}", "device=cpu", "data.num_classes=3", "data.val_fraction=0.2",
         "model.depth=2", "model.base_channels=8", "parallel.grid=null", f"train.steps={steps}",
         f"train.val_every={steps}", f"train.checkpoint_every={steps}", "train.warmup_steps=10",
         "train.lr=3e-3", "--no-progress")  # fmt: skip
    names = ["scene_008.tif", "scene_009.tif"]
    val = _validation_files(data / "images", names, tmp_path / "val")
    preds = tmp_path / "preds"
    preds.mkdir()
    _run("infer", "--checkpoint", str(run), "--input", str(val), "--output", str(preds),
         "--no-progress")  # fmt: skip
    assert "whole-image forward" in capsys.readouterr().out  # GroupNorm: whole image
    evaluation = tmp_path / "eval.json"
    _run("evaluate", str(preds), str(data / "labels"), "--run", str(run),
         "--json", str(evaluation))  # fmt: skip
    metrics = _same_dice(evaluation, run, ["class1", "class2"])
    if steps >= 300:
        assert metrics["dice_mean"] > 0.5
    for name in names:
        with tifffile.TiffFile(preds / name) as p, tifffile.TiffFile(data / "images" / name) as i:
            want = {t.code: t.value for t in i.pages[0].tags if t.code in GEOKEYS}
            got = {t.code: t.value for t in p.pages[0].tags if t.code in GEOKEYS}
            assert want and got == want
            assert p.pages[0].tags[42113].value == "255"  # GDAL_NODATA
            assert p.pages[0].is_tiled


def test_nan_in_an_inference_input_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("name: nan\n")
    _run("train", str(config), f"output_dir={run}", "device=cpu", "data.shape=[48,48]",
         "data.num_images=3", "train.steps=1", "model.depth=2", "--no-progress")  # fmt: skip
    image = np.random.default_rng(0).standard_normal((1, 70, 50)).astype(np.float32)
    image[0, 60, 7] = np.nan
    np.save(tmp_path / "in.npy", image)
    for extra in ([], ["--grid", "1", "1"]):
        argv = ["infer", "--checkpoint", str(run), "--input", str(tmp_path / "in.npy"),
                "--output", str(tmp_path / "out.npy"), "--tile", "16", "--no-progress"]  # fmt: skip
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds 1 NaN or Inf values" in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "in.npy", "run"]


def _nnunet(root):
    from haloseg.data import EllipseDataset
    from haloseg.data.export import AFFINE
    from haloseg.data.nnunet import write_nnunet

    dataset = EllipseDataset([24, 24, 16], num_images=4, num_classes=3, in_channels=2, seed=2)
    samples = [dataset.read(i, [(0, 24), (0, 24), (0, 16)]) for i in range(4)]
    for _, label in samples:
        label[0, :5] = 9  # an unannotated strip
    write_nnunet(root, [s[0] * 100 + 500 for s in samples], [s[1] for s in samples],
                 channel_names=["T1", "FLAIR"], affine=AFFINE,
                 labels_spec={"background": 0, "edema": 1, "tumour": 2, "lesion": [1, 2],
                              "ignore": 9})  # fmt: skip
    return root


def test_nnunet_raw_dataset_trains_and_its_cases_infer(tmp_path, capsys):
    data, run, preds = _nnunet(tmp_path / "Dataset001_Tiny"), tmp_path / "run", tmp_path / "p"
    config = tmp_path / "c.yaml"
    config.write_text("name: nnunet\n")
    _run("train", str(config), f"output_dir={run}", "device=cpu", "data.kind=nnunet",
         f"data.path={data}", "model.depth=2", "model.base_channels=4", "train.steps=2",
         "--no-progress")  # fmt: skip
    spec = json.loads((run / "model.json").read_text())
    assert spec["channel_names"] == ["T1", "FLAIR"]
    assert spec["label_names"] == ["background", "edema", "tumour"]
    assert spec["regions"] == {"lesion": [1, 2]} and spec["ignore_label"] == 9
    preds.mkdir()
    _run("infer", "--checkpoint", str(run), "--input", str(data / "imagesTr"), "--output",
         str(preds), "--tile", "16", "--no-progress")  # fmt: skip
    assert sorted(p.name for p in preds.iterdir()) == [f"case_{i:03d}.nii.gz" for i in range(4)]
    _run("evaluate", str(preds), str(data / "labelsTr"), "--run", str(run))
    assert "lesion" in capsys.readouterr().out
    (data / "imagesTr" / "case_002_0001.nii.gz").unlink()
    for argv in (["train", str(config), f"output_dir={tmp_path / 'r2'}", "data.kind=nnunet",
                  f"data.path={data}", "--no-progress"],
                 ["infer", "--checkpoint", str(run), "--input", str(data / "imagesTr"),
                  "--output", str(preds), "--tile", "16", "--no-progress"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "case_002_0001.nii.gz does not exist" in err[0], err
