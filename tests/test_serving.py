"""``haloseg infer`` serves the models the shipped configs train, InstanceNorm and GroupNorm
included: one process (one whole-image forward) and torchrun over a grid of processes, each
equal to one forward pass over the whole normalised image."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from _user_path import scanner_data, torchrun_infer, train, whole_logits
from haloseg.cli.main import main

TINY = ("model.preset=small", "model.depth=2", "model.base_channels=8", "train.steps=3",
        "train.val_every=3", "train.checkpoint_every=3", "train.warmup_steps=1")  # fmt: skip


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """A run of configs/msd-brain-tumour.yaml (InstanceNorm, zscore_nonzero), reduced."""
    root = tmp_path_factory.mktemp("brain")
    data = scanner_data(root / "Task01", "msd", [36, 28, 20], 4, images=4, classes=4)
    return train("msd-brain-tumour.yaml", root / "run", f"data.path={data}", *TINY), data


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A run of configs/satellite-4band.yaml (GroupNorm, zscore), reduced."""
    root = tmp_path_factory.mktemp("scenes")
    data = scanner_data(root / "scenes", "tiff", [72, 56], 4, images=4, classes=3)
    return train("satellite-4band.yaml", root / "run", f"data.path={data}",
                 "data.num_classes=3", *TINY), data  # fmt: skip


def _case(kind, brain, scenes):
    """(run, image file, its array ``(C, *spatial)``) of the last image of ``kind``'s data."""
    run, data = brain if kind == "brain" else scenes
    if kind == "brain":
        source = data / "imagesTr" / "case_003.nii.gz"
        return run, source, np.moveaxis(np.asarray(nib.load(source).dataobj), -1, 0)
    source = data / "images" / "scene_003.tif"
    return run, source, tifffile.imread(source)


def _logits(path) -> np.ndarray:
    return np.load(path).astype(np.float64)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["brain", "scenes"])
def test_one_process_serves_global_norm_models(kind, brain, scenes, tmp_path, capsys):
    run, source, image = _case(kind, brain, scenes)
    out = tmp_path / "logits.npy"
    argv = ["infer", "--checkpoint", str(run), "--input", str(source), "--output", str(out),
            "--output-type", "logits", "--max-memory", "4GB", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "whole-image forward over a" in capsys.readouterr().out
    _close(_logits(out), whole_logits(run, image))


@pytest.mark.parametrize("kind,grid", [("brain", ["2", "1", "1"]), ("scenes", ["1", "2"])])
def test_torchrun_serves_global_norm_models(kind, grid, brain, scenes, tmp_path):
    run, source, image = _case(kind, brain, scenes)
    out = tmp_path / "logits.npy"
    torchrun_infer(2, "--checkpoint", str(run), "--input", str(source), "--output", str(out),
                   "--output-type", "logits", "--grid", *grid, log=tmp_path / "log")  # fmt: skip
    _close(_logits(out), whole_logits(run, image))
    if kind == "scenes":
        return
    labels = tmp_path / "labels.zarr"
    # A grid chosen from the number of processes.
    args = ["--checkpoint", str(run), "--input", str(source), "--output", str(labels)]
    torchrun_infer(2, *args, log=tmp_path / "log2")
    import zarr

    np.testing.assert_array_equal(np.asarray(zarr.open_array(labels, mode="r")),
                                  whole_logits(run, image).argmax(0))  # fmt: skip


def test_too_large_for_one_process_names_the_command(brain, tmp_path, capsys):
    run, data = brain
    source = data / "imagesTr" / "case_003.nii.gz"
    argv = ["infer", "--checkpoint", str(run), "--input", str(source), "--output",
            str(tmp_path / "o.nii.gz"), "--max-memory", "1MB", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "InstanceNorm" in err[0] and "torchrun --nproc-per-node" in err[0] and "--grid" in err[0]
    assert not list(tmp_path.iterdir())


def test_a_deep_instance_norm_model_is_sized_and_served(tmp_path):
    """Depth 4 (the presets' depth): the memory probe keeps 2 voxels per side at the
    coarsest level, where InstanceNorm refuses 1."""
    import torch

    from haloseg.inference import predict_whole
    from haloseg.inference.run import infer
    from haloseg.models import unet_preset
    from haloseg.training.spec import RunSpec

    torch.manual_seed(0)
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}
    model = unet_preset("small", norm="instance", **args).eval()
    spec = RunSpec(haloseg_version="test", model={"preset": "small", "norm": "instance", **args},
                   normalize="none", num_classes=2)  # fmt: skip
    image = np.random.default_rng(0).standard_normal((1, 40, 36, 33)).astype(np.float32)
    np.save(tmp_path / "in.npy", image)
    result = infer(None, tmp_path / "in.npy", tmp_path / "out.npy", output="logits",
                   max_memory=2**31, model=(model, spec))  # fmt: skip
    assert result["mode"] == "whole"
    want = predict_whole(model, torch.from_numpy(image)[None], 16)[0].numpy()
    _close(np.load(tmp_path / "out.npy").astype(np.float64), want)
