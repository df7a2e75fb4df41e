"""``data.ignore_label``: voxels of that label are left out of loss and metrics, exactly, on
blocks; an ignore label inside the class range is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haloseg.cli.main import main
from haloseg.config import load_config
from haloseg.data import EllipseDataset, TiffDataset, write_tiff
from haloseg.errors import DataError
from haloseg.parallel import Decomposition
from haloseg.parallel.spawn import run_distributed
from haloseg.training.loop import build_trainer, fit
from haloseg.training.metrics import DiceTracker
from haloseg.training.samples import Augment, read_block

IGNORE = 255


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three-class scenes with an unannotated band (label 255) across each."""
    root = tmp_path_factory.mktemp("ignore")
    dataset = EllipseDataset([40, 56], num_images=6, num_classes=3, noise=0.3, seed=1)
    for i in range(len(dataset)):
        image, label = dataset.read(i, [(0, 40), (0, 56)])
        label = label.astype(np.uint8)
        label[10 + i : 17 + i, 5:50] = IGNORE
        write_tiff(root / "images" / f"s{i}.tif", image)
        write_tiff(root / "labels" / f"s{i}.tif", label)
    return root


def test_ignored_voxels_are_invalid_and_keep_the_image_statistics(scenes):
    dataset = TiffDataset.from_folder(scenes, num_classes=3, ignore_label=IGNORE)
    plain = TiffDataset.from_folder(scenes, num_classes=3, ignore_label=None)
    dec, identity = Decomposition((1, 1)), Augment.identity(2)
    block = read_block(dataset, 0, dec, (40, 56), identity, "zscore", torch.float64, IGNORE)
    label = dataset.read(0, [(0, 40), (0, 56)])[1]
    ignored = torch.from_numpy(label == IGNORE)
    assert ignored.any() and not block.valid[ignored].any() and block.valid[~ignored].all()
    assert (block.label[ignored] == 0).all()
    with pytest.raises(Exception, match="label values 0..255"):
        plain.read(0, [(0, 40), (0, 56)])  # without the ignore label, 255 is out of range
    tracker = DiceTracker(3)
    other = block.label.clone()
    other[ignored] = 2  # predictions on ignored voxels do not count
    for pred in (block.label, other):
        tracker.update(pred[None], block.label[None], block.valid[None], dec)
    assert tracker.compute()["dice_mean"] == pytest.approx(1.0)


def _config(folder, output, *extra):
    return load_config(
        None,
        [f"output_dir={output}", "device=cpu", "data.kind=tiff", f"data.path={folder}",
         "data.num_classes=3", f"data.ignore_label={IGNORE}", "model.depth=2",
         "model.base_channels=4", "train.dtype=float64", "train.steps=3", "train.val_every=3",
         "train.warmup_steps=1", "train.checkpoint_every=100", *extra],
    )  # fmt: skip


def _fit(cfg) -> tuple[list[dict], dict[str, np.ndarray]]:
    trainer = build_trainer(cfg)
    fit(trainer, progress=False)
    return trainer.history, {k: v.numpy().copy() for k, v in trainer.weights.state_dict().items()}


def test_training_with_an_ignore_label_on_blocks_equals_one_process(scenes, tmp_path):
    one = _fit(_config(scenes, tmp_path / "one"))
    blocks = run_distributed(_fit, 4, _config(scenes, tmp_path / "four", "parallel.grid=[2,2]"),
                             timeout=600)[0]  # fmt: skip
    for a, b in zip(one[0], blocks[0], strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    for key, want in one[1].items():
        np.testing.assert_allclose(blocks[1][key], want, rtol=1e-8, atol=1e-11, err_msg=key)
    with pytest.raises(DataError, match="name the value data.ignore_label"):
        _fit(_config(scenes, tmp_path / "none", "data.ignore_label=null"))


def test_ignore_label_inside_the_class_range_is_one_line(scenes, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: ignore\n")
    argv = ["train", str(config), "device=cpu", "data.kind=tiff", f"data.path={scenes}",
            "data.num_classes=3", "data.ignore_label=2", f"output_dir={tmp_path / 'r'}",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.ignore_label=2 is inside the class range 0..2" in err[0], err
    assert not (tmp_path / "r").exists()
