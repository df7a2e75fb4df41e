"""``haloseg infer --executor layerwise`` serves the models the shipped configs train
(InstanceNorm, GroupNorm) in one process, under a device budget smaller than one whole-image
forward pass needs, equal to that forward pass and keeping the files' geometry; the budget
bounds the compute memory the executor actually holds."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

import haloseg
from _layerwise_cases import one_thread  # noqa: F401 (autouse: one torch thread)
from _user_path import scanner_data, train, whole_logits
from haloseg.bench.layerwise import UncountedStore
from haloseg.cli.main import main
from haloseg.inference.budget import bytes_per_voxel
from haloseg.inference.run import load_model
from haloseg.inference.whole import whole_image_bytes
from haloseg.layerwise import run_layerwise
from haloseg.layerwise.budget import block_for_budget
from haloseg.memory.tracker import LiveBytes
from haloseg.models.unet import UNet

TINY = ("model.preset=small", "model.depth=2", "model.base_channels=8", "train.steps=3",
        "train.val_every=3", "train.checkpoint_every=3", "train.warmup_steps=1")  # fmt: skip
GEOKEYS = (33550, 33922, 34264, 34735, 34736, 34737)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """configs/msd-brain-tumour.yaml (InstanceNorm, zscore_nonzero), reduced; a volume that
    is no multiple of the network's alignment (4), so the whole-image padding matters."""
    root = tmp_path_factory.mktemp("brain")
    data = scanner_data(root / "Task01", "msd", [34, 30, 18], 4, images=3, classes=4)
    run = train("msd-brain-tumour.yaml", root / "run", f"data.path={data}", *TINY)
    source = data / "imagesTr" / "case_002.nii.gz"
    return run, source, np.moveaxis(np.asarray(nib.load(source).dataobj), -1, 0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """configs/satellite-4band.yaml (GroupNorm, zscore), reduced; GeoTIFF scenes."""
    root = tmp_path_factory.mktemp("scenes")
    data = scanner_data(root / "scenes", "tiff", [70, 54], 4, images=3, classes=3)
    run = train("satellite-4band.yaml", root / "run", f"data.path={data}",
                "data.num_classes=3", *TINY)  # fmt: skip
    source = data / "images" / "scene_002.tif"
    return run, source, tifffile.imread(source)


def _infer(run, source, out, *extra: str) -> int:
    return main(["infer", "--checkpoint", str(run), "--input", str(source), "--output", str(out),
                 "--executor", "layerwise", *extra, "--no-progress"])  # fmt: skip


def _close(got: np.ndarray, want: np.ndarray) -> None:
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def _same_labels(labels: np.ndarray, logits: np.ndarray) -> None:
    """The whole-image forward's labels, wherever its top two logits differ by more than
    float32 rounding (blocks run other convolution kernels than the whole image)."""
    top2 = np.sort(logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4 * np.abs(logits).max()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], logits.argmax(0)[clear])


def _whole_forward_bytes(run, image: np.ndarray) -> int:
    """What haloseg estimates one whole-image forward of ``image`` needs (depth 2: align 4)."""
    model, _ = load_model(run)
    per_voxel = bytes_per_voxel(model, image.ndim - 1, image.shape[0], 16)
    return whole_image_bytes(per_voxel, image.shape[1:], 4, image.shape[0])


def test_instance_norm_model_under_a_budget_below_one_whole_forward(brain, tmp_path, capsys):
    run, source, image = brain
    budget = str(_whole_forward_bytes(run, image) // 4)
    # The one-process whole-image path refuses this budget ...
    whole = ["infer", "--checkpoint", str(run), "--input", str(source), "--output",
             str(tmp_path / "no.npy"), "--max-memory", budget, "--no-progress"]  # fmt: skip
    assert main(whole) == 2
    assert "needs about" in capsys.readouterr().err
    # ... which the layer-wise executor serves, over several blocks, equal to it.
    out = tmp_path / "logits.npy"
    assert _infer(run, source, out, "--output-type", "logits", "--max-memory", budget) == 0
    said = capsys.readouterr().out
    assert "layer by layer over blocks of" in said and "zscore_nonzero normalised" in said
    block = said.split("blocks of ")[1].split(",")[0].split("x")
    assert math.prod(int(b) for b in block) < 36 * 32 * 20  # the padded volume
    _close(np.load(out).astype(np.float64), whole_logits(run, image))


def test_nifti_labels_keep_the_affine_with_a_zarr_store(brain, tmp_path):
    run, source, image = brain
    out, acts = tmp_path / "labels.nii.gz", tmp_path / "acts"
    assert _infer(run, source, out, "--block", "16", "12", "8", "--store", str(acts)) == 0
    pred, given = nib.load(out), nib.load(source)
    np.testing.assert_array_equal(pred.affine, given.affine)
    assert pred.header.get_zooms() == given.header.get_zooms()[:3]
    _same_labels(np.asarray(pred.dataobj), whole_logits(run, image))
    assert list(acts.iterdir()) == []  # the activations' arrays are gone


def test_group_norm_scene_keeps_its_georeference(scenes, tmp_path):
    run, source, image = scenes
    out = tmp_path / "labels.tif"
    assert _infer(run, source, out, "--block", "16") == 0
    _same_labels(tifffile.imread(out), whole_logits(run, image))
    with tifffile.TiffFile(out) as p, tifffile.TiffFile(source) as i:
        want = {t.code: t.value for t in i.pages[0].tags if t.code in GEOKEYS}
        got = {t.code: t.value for t in p.pages[0].tags if t.code in GEOKEYS}
        assert want and got == want


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--block", "8", "8"], "--block 8 8 must be one size >= 1 or 3 of them"),
        (["--block", "8", "--tile", "16"], "--tile does not apply to --executor layerwise"),
        ([], "give --block or --max-memory"),
        (["--max-memory", "1KB"], "fits no block"),
    ],
)
def test_bad_flags_are_one_line(brain, tmp_path, capsys, extra, message):
    run, source, _ = brain
    assert _infer(run, source, tmp_path / "o.npy", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())


def test_block_without_the_layerwise_executor_is_refused(brain, tmp_path, capsys):
    run, source, _ = brain
    argv = ["infer", "--checkpoint", str(run), "--input", str(source), "--output",
            str(tmp_path / "o.npy"), "--block", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "--block sets the blocks of --executor layerwise" in capsys.readouterr().err


@pytest.mark.parametrize(("norm", "up"), [("instance", "linear"), ("group", "transposed")])
def test_the_budget_bounds_the_compute_memory_held(norm: str, up: str) -> None:
    torch.manual_seed(0)
    m = UNet(spatial_dims=3, in_channels=2, out_channels=3, depth=2, base_channels=4, norm=norm,
             upsampling=up).eval()  # fmt: skip
    x = torch.randn(1, 2, 32, 24, 28)
    budget = 2**20
    block = block_for_budget(m, x.shape, x.dtype, budget, align=4)
    assert all(b % 4 == 0 for b in block) and math.prod(block) < x[0, 0].numel()
    with LiveBytes("cpu") as meter:
        meter.live = meter.peak = 0
        y = run_layerwise(m, x, block=block, store=UncountedStore(meter))
    params = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert meter.peak + params <= budget
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_run_layerwise_is_part_of_the_public_api() -> None:
    torch.manual_seed(0)
    m = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=4,
             norm="instance").double().eval()  # fmt: skip
    x = torch.randn(1, 1, 20, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
    assert "run_layerwise" in haloseg.__all__
    torch.testing.assert_close(haloseg.run_layerwise(m, x, block=8), ref, rtol=1e-10, atol=0)
