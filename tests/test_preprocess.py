"""Training's preprocessing replayed at inference: whole-image statistics from a streaming
pass over chunks (an image larger than the budget is never held whole), the run's spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _user_path import zscore
from haloseg.cli.main import main
from haloseg.data.normalize import block_moments, normalization_mask, zscore_from_moments
from haloseg.inference import predict_tiled, predict_whole
from haloseg.inference.preprocess import image_moments, image_statistics
from haloseg.inference.run import infer, load_model
from haloseg.training.checkpoint import latest_checkpoint


class _Recorded:
    """An image view that records the size of every read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        block = self.array[index]
        self.reads.append(block.size)
        return block


def _scanner_image(shape=(2, 300, 211)) -> np.ndarray:
    rng = np.random.default_rng(3)
    image = rng.normal(800, 150, shape) * (1 + np.arange(shape[0]))[:, None, None]
    image[:, :40] = 0  # background, left out by zscore_nonzero
    return image.astype(np.float32)


@pytest.mark.parametrize("scheme", ["zscore", "zscore_nonzero"])
def test_streamed_statistics_equal_the_whole_image_computation(scheme):
    image = _scanner_image()
    whole = torch.from_numpy(image)
    valid = torch.ones(image.shape[1:], dtype=torch.bool)
    want = zscore_from_moments(block_moments(whole, normalization_mask(whole, valid, scheme)))
    view = _Recorded(image)
    got = image_statistics(view, scheme, (48, 40))
    assert max(view.reads) <= 2 * 48 * 40 < image.size / 10  # never more than one chunk
    for g, w in zip((got.mean, got.std), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.mean.numpy(), [image[c][image[c] != 0].mean() if
                               scheme == "zscore_nonzero" else image[c].mean()
                               for c in range(2)], rtol=1e-6)  # fmt: skip
    parts = sum(image_moments(view, scheme, (48, 40), part=(k, 3)) for k in range(3))
    torch.testing.assert_close(parts, image_moments(view, scheme, (48, 40)), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec") / "run"
    config = folder.parent / "c.yaml"
    config.write_text("name: spec\n")
    argv = ["train", str(config), f"output_dir={folder}", "data.shape=[64,64]", "device=cpu",
            "data.num_images=4", "data.in_channels=2", "data.normalize=zscore_nonzero",
            "data.regions={fg: [1, 2]}", "train.steps=2", "model.depth=3",
            "model.upsampling=nearest", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return folder


def test_the_run_folder_describes_its_model(run):
    spec = json.loads((run / "model.json").read_text())
    assert spec["model"] == {"preset": "small", "spatial_dims": 2, "in_channels": 2,
                             "out_channels": 3, "depth": 3, "upsampling": "nearest"}  # fmt: skip
    assert spec["normalize"] == "zscore_nonzero"
    assert spec["channel_names"] == ["channel0", "channel1"]
    assert spec["num_classes"] == 3 and spec["regions"] == {"fg": [1, 2]}
    assert spec["haloseg_version"] == "0.1.0"
    # The checkpoint file alone rebuilds the same model and preprocessing.
    alone, spec_alone = load_model(latest_checkpoint(run / "checkpoints"))
    model, _ = load_model(run)
    assert spec_alone.to_dict() == spec
    for (k, a), b in zip(model.state_dict().items(), alone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_infer_with_small_tiles_normalises_like_the_whole_image(run, tmp_path):
    image = _scanner_image((2, 260, 190))
    np.save(tmp_path / "in.npy", image)
    result = infer(run, tmp_path / "in.npy", tmp_path / "out.npy", output="logits", tile=(32,))
    assert result["normalize"] == "zscore_nonzero" and result["tile"] == [32, 32]
    model, _ = load_model(run)
    want = predict_whole(model, zscore(image, "zscore_nonzero")[None], 8)[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())  # fmt: skip


def test_predict_tiled_normalises_without_holding_the_image(run):
    """The library path: every read (statistics chunks, then tiles) is a small part of the
    image, and the result equals one forward pass over the whole normalised image."""
    model, spec = load_model(run)
    image = _scanner_image((2, 400, 380))  # a tile (core 32 + halo 56 per side) is < 1/4
    view = _Recorded(image)
    got = predict_tiled(model, view, (32, 32), output="logits", normalize=spec.normalize)
    assert max(view.reads) < image.size / 4
    want = predict_whole(model, zscore(image, spec.normalize)[None], 8)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_float64_model_gets_inputs_normalised_in_float64():
    """As training: raw float32 voxels, normalised in the model's dtype (not rounded to
    float32 first)."""
    import dataclasses

    image = _scanner_image((2, 60, 50))
    norm = image_statistics(image, "zscore_nonzero", (16, 16))
    got = dataclasses.replace(norm, dtype=torch.float64)(image)
    assert got.dtype == np.float64
    x = torch.from_numpy(image).double()
    want = torch.where(x != 0, (x - norm.mean.view(-1, 1, 1)) / norm.std.view(-1, 1, 1), 0.0)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-15, atol=1e-15)
    assert np.abs(norm(image) - want.numpy()).max() > 1e-9  # float32 would round


def test_numbered_files_are_channels_only_below_the_channel_count(tmp_path):
    from haloseg.inference.cases import find_cases

    for name in ("amos_0001.npy", "amos_0002.npy"):
        np.save(tmp_path / name, np.zeros((4, 4), np.float32))
    assert [c for c, _ in find_cases(tmp_path, 1)] == ["amos_0001", "amos_0002"]
    grouped = tmp_path / "g"
    grouped.mkdir()
    for name in ("BRATS_001_0000.npy", "BRATS_001_0001.npy", "BRATS_002_0000.npy",
                 "BRATS_002_0001.npy"):  # fmt: skip
        np.save(grouped / name, np.zeros((4, 4), np.float32))
    cases = find_cases(grouped, 2)
    assert [c for c, _ in cases] == ["BRATS_001", "BRATS_002"]
    assert [p.rsplit("/", 1)[1] for p in cases[0][1]] == [
        "BRATS_001_0000.npy",
        "BRATS_001_0001.npy",
    ]
