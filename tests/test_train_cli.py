"""``haloseg train`` and ``haloseg data synth`` end to end, in one process: a good run writes
its outputs; every bad input ends in exit code 2, one ``haloseg: error:`` line naming the
offending value or file, and nothing half-written."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from haloseg.cli.main import main
from haloseg.config import load_config
from haloseg.data import write_msd, write_tiff, write_zarr

# About a second a run: 4 images (3 train, 1 validate), 2 steps, a 2-level U-Net on the CPU.
TINY = [
    "data.shape=[32, 32]", "data.num_images=4", "train.steps=2", "train.val_every=1",
    "model.depth=2", "model.base_channels=4", "device=cpu",
]  # fmt: skip
OUTPUTS = ["config.yaml", "metrics.json", "curve.png", "overlays.png", "checkpoints/latest.json"]


def _config(folder: Path, text: str = "name: tiny\n") -> Path:
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


def _train(config: Path, run: Path, *args: str) -> int:
    """``haloseg train CONFIG output_dir=RUN TINY... ARGS``; flags in ``args`` go last."""
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    argv = ["train", str(config), f"output_dir={run}", *TINY, *overrides, *flags]
    return main([*argv, "--no-progress"])


def _error(capsys: pytest.CaptureFixture[str], *names: object) -> str:
    """The one stderr line of a refused command, after checking it names each of ``names``."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("haloseg: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _stray(folder: Path) -> list[Path]:
    """Temporary or partial files an interrupted write would leave."""
    return [
        p for p in folder.rglob("*")
        if p.name.startswith(".") or ".tmp" in p.name or ".partial" in p.name
    ]  # fmt: skip


def _failed_cleanly(run: Path, *, started: bool = False) -> None:
    """No temp files, checkpoint or metrics in ``run``; nothing at all unless the run had
    ``started`` (passed every check before its first step)."""
    if not run.exists():
        return
    assert not _stray(run)
    assert not (run / "metrics.json").exists()
    assert not (run / "checkpoints" / "latest.json").exists()
    assert not list(run.rglob("*.pt"))
    if not started:
        assert not [p for p in run.rglob("*") if p.is_file()]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.parent.name in ("checkpoints", run.name)
        and p.suffix in (".json", ".pt", ".yaml")
    }  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished tiny run on 1-channel synthetic images, and what it printed."""
    folder = tmp_path_factory.mktemp("finished")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert _train(_config(folder), folder / "run") == 0
    return folder / "run", stdout.getvalue()


@pytest.fixture
def finished_copy(finished: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the finished run that a test may resume or damage."""
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


# --- datasets on disk ---------------------------------------------------------------------


def _labelled(rng: np.random.Generator, shape: tuple[int, ...], channels: int = 1):
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    label = (image[0] > 0.5).astype(np.uint8) + (image[0] > 1.5)
    return image, label


def _msd(folder: Path, cases: int = 4) -> Path:
    rng = np.random.default_rng(0)
    data = [_labelled(rng, (16, 16, 16)) for _ in range(cases)]
    root = folder / "Task99_Tiny"
    write_msd(root, *zip(*data), modality=["MR"], labels_names=["bg", "a", "b"])
    return root


def _tiff(folder: Path, scenes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root = folder / "scenes"
    for i in range(scenes):
        image, label = _labelled(rng, (32, 32))
        write_tiff(root / "images" / f"scene_{i}.tif", image[0])
        write_tiff(root / "labels" / f"scene_{i}.tif", label)
    return root


def _msd_args(root: Path) -> list[str]:
    return ["data.kind=msd", f"data.path={root}"]


def _tiff_args(root: Path) -> list[str]:
    return ["data.kind=tiff", f"data.path={root}", "data.num_classes=3"]


# --- a good run ---------------------------------------------------------------------------


def test_train_writes_outputs(finished):
    run, stdout = finished
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 2: validation Dice" in stdout and f"outputs: {run}/" in stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["val_loss"])
    assert {"dice_class1", "dice_class2", "dice_mean"} <= metrics.keys()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert load_config(run / "config.yaml").output_dir == str(run)
    assert not _stray(run)


def test_resume_of_finished_run_does_nothing_more(finished_copy, capsys):
    before = _snapshot(finished_copy)
    config = _config(finished_copy.parent)
    assert _train(config, finished_copy, "--resume") == 0
    assert "step 2: validation Dice" in capsys.readouterr().out
    after = _snapshot(finished_copy)
    # No step, so no new checkpoint; config.yaml differs only in the copy's output_dir.
    checkpoints = [k for k in before if k.startswith("checkpoints")]
    assert checkpoints and {k: after[k] for k in checkpoints} == {k: before[k] for k in checkpoints}
    assert after.keys() == before.keys()
    # The results stay; the timing fields are not compared (a resume that runs no step
    # measures none).
    results = ("step", "loss", "val_loss", "dice_class1", "dice_class2", "dice_mean", "steps")
    metrics_before, metrics_after = (json.loads(m["metrics.json"]) for m in (before, after))
    assert {k: metrics_after[k] for k in results} == {k: metrics_before[k] for k in results}
    assert not _stray(finished_copy)


def test_finished_run_without_resume_is_refused(finished_copy, capsys):
    before = _snapshot(finished_copy)
    assert _train(_config(finished_copy.parent), finished_copy) == 2
    _error(capsys, finished_copy, "already holds a run", "--resume")
    assert _snapshot(finished_copy) == before and not _stray(finished_copy)


def test_resume_with_other_channel_count_is_refused(finished_copy, capsys):
    before = _snapshot(finished_copy)
    config = _config(finished_copy.parent)
    assert _train(config, finished_copy, "data.in_channels=2", "--resume") == 2
    _error(capsys, "takes 1 input channels but the images have 2")
    assert _snapshot(finished_copy) == before and not _stray(finished_copy)


def test_resume_with_another_model_is_refused(finished_copy, capsys):
    before = _snapshot(finished_copy)
    config = _config(finished_copy.parent)
    assert _train(config, finished_copy, "model.base_channels=8", "--resume") == 2
    _error(capsys, "model.base_channels changed", "config.yaml")
    assert _snapshot(finished_copy) == before and not _stray(finished_copy)


def test_demo_into_a_finished_run_is_one_line(finished_copy, capsys):
    assert main(["demo", "--steps", "1", "--size", "64", "--output", str(finished_copy)]) == 2
    _error(capsys, "already holds a run")


@pytest.mark.parametrize(
    ("name", "shape"), [("ellipses-2d", "[32, 32]"), ("ellipsoids-3d", "[16, 16, 16]")]
)
def test_example_config_in_one_process(tmp_path, capsys, name, shape):
    config = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    small = [f"data.shape={shape}", "train.batch_size=1"]
    # As written it asks for 4 processes; launched alone it says how to launch it.
    assert _train(config, tmp_path / "run", *small) == 2
    _error(capsys, "4 processes, but 1 were launched", "--nproc-per-node=4")
    assert not (tmp_path / "run").exists()
    assert _train(config, tmp_path / "run", *small, "parallel.grid=null") == 0
    assert load_config(tmp_path / "run" / "config.yaml").name == name


@pytest.mark.parametrize(
    ("side", "pad", "nearest"), [(40, "false", None), (42, "false", (40, 44)), (42, "true", None)]
)
def test_image_size_against_the_network(tmp_path, capsys, side, pad, nearest):
    run = tmp_path / "run"
    args = [f"data.shape=[{side}, {side}]", f"data.pad={pad}"]
    code = _train(_config(tmp_path), run, *args)
    if nearest is None:
        assert code == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert math.isfinite(metrics["val_loss"]) and "dice_mean" in metrics
        assert (run / "overlays.png").is_file()
    else:
        assert code == 2
        _error(capsys, f"size {side}", f"use {nearest[0]} or {nearest[1]}")
        _failed_cleanly(run)


# --- bad configuration --------------------------------------------------------------------


def test_unknown_key_on_the_command_line(tmp_path, capsys):
    assert _train(_config(tmp_path), tmp_path / "run", "train.stepz=3") == 2
    _error(capsys, "'train.stepz'", "did you mean 'steps'?")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_the_yaml(tmp_path, capsys):
    config = _config(tmp_path, "name: tiny\nmodel:\n  dpeth: 2\n")
    assert _train(config, tmp_path / "run") == 2
    _error(capsys, "'model.dpeth'", "did you mean 'depth'?")
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_is_one_line(tmp_path, capsys):
    config = _config(tmp_path, "name: tiny\ntrain: {steps: 2\n")
    assert _train(config, tmp_path / "run") == 2
    _error(capsys, config, "is not valid YAML at line")


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--no-progress"]) == 2
    _error(capsys, tmp_path / "nope.yaml", "does not exist")


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.steps", ["override 'train.steps' is not key=value"]),
        ("data.shape=[32,", ["override 'data.shape=[32,' is not valid YAML"]),
        ("train.lr=fast", ["train.lr='fast' is not of type float"]),
        ("train.weight_decay=-1", ["train.weight_decay=-1 must be >= 0"]),
    ],
)
def test_bad_override(tmp_path, capsys, override, names):
    assert _train(_config(tmp_path), tmp_path / "run", override) == 2
    _error(capsys, *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("grid", "names"),
    [
        ("[2, 2]", ["grid [2, 2] = 4 processes, but 1 were launched", "--nproc-per-node=4"]),
        ("[1, 1, 1]", ["parallel.grid=[1, 1, 1] has 3 extents but the images are 2-D"]),
    ],
)
def test_grid_that_does_not_fit_the_processes(tmp_path, capsys, grid, names):
    assert _train(_config(tmp_path), tmp_path / "run", f"parallel.grid={grid}") == 2
    _error(capsys, *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", ["run", "."], ids=["below-a-file", "a-file"])
def test_unwritable_run_folder(tmp_path, capsys, inside):
    # A path through a regular file cannot be created, even by root (unlike chmod 0o500).
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    run = blocker / inside
    assert _train(_config(tmp_path), run) == 2
    _error(capsys, f"run folder {str(run)!r} is not writable", "output_dir=")
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "tiny.yaml"]


# --- bad data -----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["imagesTr", "labelsTr"])
def test_missing_nifti(tmp_path, capsys, folder):
    root = _msd(tmp_path)
    (root / folder / "case_001.nii.gz").unlink()
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, root / folder / "case_001.nii.gz", "does not exist")
    assert not (tmp_path / "run").exists()


def test_corrupt_nifti(tmp_path, capsys):
    root = _msd(tmp_path)
    bad = root / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 50)
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, bad, "is not a readable NIfTI file")
    _failed_cleanly(tmp_path / "run")


def test_truncated_nifti(tmp_path, capsys):
    # The header still parses, so the error comes when the voxels are read, in the first step.
    root = _msd(tmp_path)
    for path in (root / "imagesTr").iterdir():
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, root / "imagesTr" / "case_00", "is not a readable NIfTI file")
    _failed_cleanly(tmp_path / "run", started=True)


def test_missing_tiff_label(tmp_path, capsys):
    root = _tiff(tmp_path)
    (root / "labels" / "scene_1.tif").unlink()
    assert _train(_config(tmp_path), tmp_path / "run", *_tiff_args(root)) == 2
    _error(capsys, root / "images" / "scene_1.tif", root / "labels" / "scene_1.tif")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folder", ["images", "labels"])
def test_corrupt_tiff(tmp_path, capsys, folder):
    root = _tiff(tmp_path)
    bad = root / folder / "scene_1.tif"
    bad.write_bytes(b"this is not a TIFF file" * 50)
    assert _train(_config(tmp_path), tmp_path / "run", *_tiff_args(root)) == 2
    _error(capsys, bad, "is not a readable TIFF file")
    assert not (tmp_path / "run").exists()


def test_msd_shape_mismatch(tmp_path, capsys):
    root = _msd(tmp_path)
    label = root / "labelsTr" / "case_002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), np.eye(4)), label)
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, root / "imagesTr" / "case_002.nii.gz", label, "(16, 16, 16)", "(16, 16, 12)")
    _failed_cleanly(tmp_path / "run")


def test_tiff_shape_mismatch(tmp_path, capsys):
    root = _tiff(tmp_path)
    label = root / "labels" / "scene_2.tif"
    write_tiff(label, np.zeros((32, 24), np.uint8))
    assert _train(_config(tmp_path), tmp_path / "run", *_tiff_args(root)) == 2
    _error(capsys, label, "(32, 24)", "(32, 32)")
    assert not (tmp_path / "run").exists()


def _nan_zarr(folder: Path) -> tuple[Path, str]:
    images = np.ones((2, 1, 32, 32), np.float32)
    images[0, 0, 5, 7] = np.nan
    images[1, 0, 0, 0] = np.inf
    root = write_zarr(folder / "nan.zarr", images, np.zeros((2, 32, 32), np.uint8), num_classes=2)
    return root, f"{root}/images[0]"


def _nan_tiff(folder: Path) -> tuple[Path, str]:
    root = _tiff(folder, scenes=2)
    for i, value in enumerate([np.nan, np.inf]):
        image = np.ones((32, 32), np.float32)
        image[5, 7] = value
        write_tiff(root / "images" / f"scene_{i}.tif", image)
    return root, str(root / "images" / "scene_0.tif")


@pytest.mark.parametrize("kind", ["zarr", "tiff"])
def test_nan_in_an_image(tmp_path, capsys, kind):
    # The first image trains, the second validates; both hold one non-finite value.
    root, name = (_nan_zarr if kind == "zarr" else _nan_tiff)(tmp_path)
    args = [f"data.kind={kind}", f"data.path={root}", "data.val_fraction=0.5"]
    args += ["data.num_classes=3"] if kind == "tiff" else []
    assert _train(_config(tmp_path), tmp_path / "run", *args) == 2
    _error(capsys, name, "holds 1 NaN or Inf values")
    _failed_cleanly(tmp_path / "run", started=True)


def test_msd_without_training_cases(tmp_path, capsys):
    root = _msd(tmp_path)
    spec = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "training": []}))
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, root / "dataset.json", "lists no training cases")
    assert not (tmp_path / "run").exists()


def test_tiff_folder_without_images(tmp_path, capsys):
    root = tmp_path / "scenes"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    assert _train(_config(tmp_path), tmp_path / "run", *_tiff_args(root)) == 2
    _error(capsys, root / "images", "holds no .tif or .tiff files")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["msd", "tiff", "zarr"])
def test_dataset_folder_that_does_not_exist(tmp_path, capsys, kind):
    missing = tmp_path / "nowhere"
    args = [f"data.kind={kind}", f"data.path={missing}", "data.num_classes=3"]
    assert _train(_config(tmp_path), tmp_path / "run", *args) == 2
    _error(capsys, missing)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("escape", ["../x.nii.gz", "./imagesTr/../../x.nii.gz", "ABSOLUTE"])
def test_dataset_json_path_outside_the_folder(tmp_path, capsys, escape):
    root = _msd(tmp_path)
    outside = tmp_path / "x.nii.gz"  # exists, so only the location is wrong
    shutil.copy(root / "imagesTr" / "case_000.nii.gz", outside)
    escape = str(outside) if escape == "ABSOLUTE" else escape
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][1]["image"] = escape
    (root / "dataset.json").write_text(json.dumps(spec))
    assert _train(_config(tmp_path), tmp_path / "run", *_msd_args(root)) == 2
    _error(capsys, repr(escape), "lies outside the dataset folder")
    assert not (tmp_path / "run").exists()


# --- haloseg data synth -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "shape"), [("zarr", ["32", "32"]), ("tiff", ["32", "32"]), ("msd", ["16"] * 3)]
)
def test_synth_then_train(tmp_path, capsys, fmt, shape):
    out = tmp_path / f"data-{fmt}"
    synth = ["data", "synth", str(out), "--format", fmt, "--shape", *shape, "--num-images", "4"]
    assert main(synth) == 0
    assert str(out) in capsys.readouterr().out
    assert out.is_dir() and not _stray(tmp_path)
    run = tmp_path / "run"
    args = [f"data.kind={fmt}", f"data.path={out}"]
    args += ["data.num_classes=3"] if fmt == "tiff" else []
    assert _train(_config(tmp_path), run, *args) == 0
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    assert {"dice_class1", "dice_class2"} <= json.loads((run / "metrics.json").read_text()).keys()

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(synth) == 2
    _error(capsys, out, "already exists")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--format", "tiff", "--shape", "16", "16", "16"], ["tiff scenes are 2-D"]),
        (["--format", "msd", "--shape", "16", "16"], ["MSD (NIfTI) volumes are 3-D"]),
        (["--shape", "4", "4"], ["synthetic shape [4, 4]"]),
        (["--seed", "-1"], ["seed >= 0", "-1"]),
    ],
)
def test_synth_bad_arguments(tmp_path, capsys, args, names):
    out = tmp_path / "data"
    assert main(["data", "synth", str(out), "--num-images", "2", *args]) == 2
    _error(capsys, *names)
    assert list(tmp_path.iterdir()) == []


def test_synth_into_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = blocker / "data"
    assert main(["data", "synth", str(out), "--shape", "32", "32", "--num-images", "2"]) == 2
    _error(capsys, out, "cannot write")
    assert blocker.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # no partial output left


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "haloseg", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "data" in done.stdout
