"""``haloseg infer``: files in, files out, equal to whole-image inference; bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from _user_path import zscore
from haloseg.cli.main import main
from haloseg.inference import predict_whole
from haloseg.inference.io import open_image
from haloseg.inference.run import infer, load_model
from haloseg.parallel.spawn import run_distributed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("infer") / "run"
    config = folder.parent / "c.yaml"
    config.write_text("name: tiny\n")
    args = ["train", str(config), f"output_dir={folder}", "data.shape=[64,64]", "device=cpu",
            "data.num_images=4", "train.steps=2", "model.depth=3", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return folder


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).standard_normal((1, 300, 211)).astype(np.float32)


def _whole_labels(run, image) -> np.ndarray:
    model, spec = load_model(run)
    assert spec.normalize == "zscore"
    return predict_whole(model, zscore(image, "zscore")[None], 8)[0].argmax(0).numpy()


def _read(path) -> np.ndarray:
    name = str(path)
    if name.endswith(".npy"):
        return np.load(path)
    if name.endswith(".zarr"):
        return np.asarray(zarr.open_array(path, mode="r"))
    if name.endswith(".tif"):
        return tifffile.imread(path)
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("out_suffix", [".npy", ".zarr", ".tif", ".nii.gz"])
def test_infer_writes_the_whole_image_labels(run, image, tmp_path, out_suffix, capsys):
    source = tmp_path / "in.npy"
    np.save(source, image)
    target = tmp_path / f"out{out_suffix}"
    argv = ["infer", "--checkpoint", str(run), "--input", str(source), "--output", str(target),
            "--tile", "64", "--no-progress"]  # fmt: skip
    if out_suffix == ".npy":
        argv += ["--preview", str(tmp_path / "p.png")]
    assert main(argv) == 0
    assert "tiles of 64x64 + halo" in capsys.readouterr().out
    np.testing.assert_array_equal(_read(target), _whole_labels(run, image))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    if out_suffix == ".npy":
        assert (tmp_path / "p.png").stat().st_size > 0


def test_inputs_in_every_format_read_as_channels_first(tmp_path, image):
    planes = np.concatenate([image, 2 * image])  # 2 channels
    np.save(tmp_path / "a.npy", np.moveaxis(planes, 0, -1))
    zarr.create_array(tmp_path / "a.zarr", data=planes, chunks=(2, 64, 64))
    tifffile.imwrite(tmp_path / "a.tif", np.moveaxis(planes, 0, -1), tile=(64, 64))
    tifffile.imwrite(tmp_path / "b.tif", planes, tile=(64, 64), planarconfig="separate")
    for name in ("a.npy", "a.zarr", "a.tif", "b.tif"):
        got = open_image(tmp_path / name, 2, 2)
        assert tuple(got.shape) == (2, 300, 211), name
        np.testing.assert_array_equal(got[:, 10:70, 5:9], planes[:, 10:70, 5:9], err_msg=name)
    volume = np.random.default_rng(1).standard_normal((20, 24, 16, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    got = open_image(tmp_path / "v.nii.gz", 3, 3)
    np.testing.assert_array_equal(got[:, 2:9, :, 3:4], np.moveaxis(volume, -1, 0)[:, 2:9, :, 3:4])


def test_memory_budget_chooses_the_tile(run, image, tmp_path):
    np.save(tmp_path / "in.npy", image)
    small = infer(run, tmp_path / "in.npy", tmp_path / "a.npy", max_memory=_resident() + 40e6)
    large = infer(run, tmp_path / "in.npy", tmp_path / "b.npy", max_memory=_resident() + 400e6)
    assert small["tile"][0] < large["tile"][0]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def _resident() -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _infer_part(run, source, target) -> None:
    infer(run, source, target, tile=(64, 64))


def test_distributed_refusal_reaches_every_rank(run, image, tmp_path):
    """Rank 0 alone creates the output; its refusal must not leave rank 1 waiting."""
    np.save(tmp_path / "in.npy", image)
    np.save(tmp_path / "exists.npy", np.zeros(1))
    with pytest.raises(Exception, match="already exists"):
        run_distributed(_infer_part, 2, run, tmp_path / "in.npy", tmp_path / "exists.npy",
                        timeout=120)  # fmt: skip


def test_distributed_inference_equals_one_process(run, image, tmp_path):
    np.save(tmp_path / "in.npy", image)
    for target in ("two.zarr", "two.npy"):
        run_distributed(_infer_part, 2, run, tmp_path / "in.npy", tmp_path / target, timeout=300)
        np.testing.assert_array_equal(_read(tmp_path / target), _whole_labels(run, image))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--input", "missing.npy"], "does not exist"),
        (["--input", "wrong.npy"], "takes 1 channel"),
        (["--input", "in.npy", "--output", "exists.npy"], "already exists"),
        (["--input", "in.npy", "--max-memory", "1KB"], "fits no tile"),
        (["--input", "in.npy", "--max-memory", "lots"], "is not like 2GB"),
        (["--input", "in.npy", "--output", "out.png"], "none of the suffixes"),
        (["--input", "in.npy", "--checkpoint", "nowhere"], "does not exist"),
        (["--input", "cut.nii.gz"], "cut.nii.gz is not readable"),
        (["--input", "nowhere/"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(run, image, tmp_path, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("in.npy", image)
    np.save("wrong.npy", np.zeros((3, 40, 40), np.float32))
    np.save("exists.npy", np.zeros(1))
    nib.save(nib.Nifti1Image(image[0], np.eye(4)), "whole.nii.gz")
    data = open("whole.nii.gz", "rb").read()
    open("cut.nii.gz", "wb").write(data[: len(data) // 2])  # a truncated download
    argv = ["infer", "--checkpoint", str(run), "--output", "out.npy", "--tile", "64",
            "--no-progress", *extra]  # fmt: skip
    if "--max-memory" in extra:
        argv.remove("--tile")
        argv.remove("64")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
