"""Training over processes = training in one process: losses, validation metrics, final
weights and BatchNorm running statistics, over a few AdamW steps in fp64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from haloseg.config import load_config
from haloseg.data import EllipseDataset
from haloseg.parallel import Decomposition, cross_entropy, soft_dice_loss
from haloseg.parallel.spawn import run_distributed
from haloseg.training.loop import build_trainer, fit
from haloseg.training.metrics import DiceTracker
from haloseg.training.samples import Augment, draw_augment, padded_shape, read_block


def _config(tmp: str, *overrides: str):
    return load_config(
        None,
        [
            f"output_dir={tmp}", "device=cpu", "data.shape=[42,58]", "data.num_images=6",
            "model.depth=2", "model.base_channels=4", "train.dtype=float64", "train.steps=3",
            "train.batch_size=2", "train.accumulate=2", "train.val_every=2",
            "train.warmup_steps=1", "train.checkpoint_every=100", *overrides,
        ],
    )  # fmt: skip


def _fit(cfg) -> tuple[list[dict], dict[str, torch.Tensor]]:
    trainer = build_trainer(cfg)
    fit(trainer, progress=False)
    # NumPy, not tensors: tensors would travel as shared memory of a process about to exit.
    return trainer.history, {k: v.numpy().copy() for k, v in trainer.weights.state_dict().items()}


def _run(cfg, world: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    results = run_distributed(_fit, world, cfg, timeout=600)
    results = [(h, {k: torch.from_numpy(v) for k, v in w.items()}) for h, w in results]
    for history, weights in results[1:]:  # every rank holds the same replicated result
        assert history == results[0][0]
        for k, v in weights.items():
            torch.testing.assert_close(v, results[0][1][k], rtol=0, atol=0)
    return results[0]


def _assert_same_run(got, want) -> None:
    (h_got, w_got), (h_want, w_want) = got, want
    assert [h["step"] for h in h_got] == [h["step"] for h in h_want] == [1, 2, 3]
    for a, b in zip(h_got, h_want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), key
    assert w_got.keys() == w_want.keys()
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-9, atol=1e-11, msg=k)
    moved = [k for k in w_want if "running_mean" in k]
    assert moved and all(w_want[k].abs().sum() > 0 for k in moved)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return _run(_config(str(tmp_path_factory.mktemp("single"))), 1)


@pytest.mark.parametrize("grid", [(1, 2), (2, 2)], ids=["1x2", "2x2"])
def test_spatial_training_equals_one_process(grid, single_run, tmp_path):
    cfg = _config(str(tmp_path), f"parallel.grid={list(grid)}")
    _assert_same_run(_run(cfg, grid[0] * grid[1]), single_run)


@pytest.mark.parametrize("memory", [[], ["memory.checkpoint=true", "memory.swap=all"]],
                         ids=["plain", "checkpoint+swap"])  # fmt: skip
def test_data_times_space_training_equals_one_process(memory, tmp_path):
    # BatchNorm: batch statistics over both replicas' images, as over the one process's batch;
    # with checkpointing under DDP too, each replica's batch counted once.
    one = _config(str(tmp_path / "one"))
    mesh = _config(str(tmp_path / "mesh"), "parallel.data=2", "parallel.grid=[1,2]",
                   "train.batch_size=1", *memory)  # fmt: skip
    got, want = _run(mesh, 4), _run(one, 1)
    (h_got, w_got), (h_want, w_want) = got, want
    for a, b in zip(h_got, h_want, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), key
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-9, atol=1e-11, msg=k)
    assert any("running_var" in k for k in w_want)


def test_training_learns_the_ellipses(tmp_path):
    cfg = _config(str(tmp_path), "train.dtype=float32", "train.steps=60",
                  "train.accumulate=1", "train.val_every=60", "data.shape=[64,64]",
                  "data.num_images=12", "model.depth=3", "model.base_channels=8")  # fmt: skip
    history, _ = _fit(cfg)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["dice_mean"] > 0.5


# -- blocks of augmented, padded samples ------------------------------------------------------


def test_augmented_block_is_the_block_of_the_augmented_image():
    dataset = EllipseDataset((24, 24, 16), num_images=1, in_channels=2)
    whole_image, whole_label = dataset.read(0, [(0, 24), (0, 24), (0, 16)])
    rng = np.random.default_rng(3)
    turned = 0
    for _ in range(12):
        aug = draw_augment((24, 24, 16), rng)
        turned += aug.perm != (0, 1, 2)
        assert aug.perm[2] == 2  # only equal-length axes trade places
        want = aug.apply(whole_image)
        box = [(4, 20), (0, 9), (3, 16)]
        source = aug.source_box(box, (24, 24, 16))
        image, label = dataset.read(0, source)
        np.testing.assert_array_equal(aug.apply(image), want[:, 4:20, 0:9, 3:16])
        np.testing.assert_array_equal(aug.apply(label), aug.apply(whole_label)[4:20, 0:9, 3:16])
    assert turned > 0


def test_padding_marks_invalid_voxels_and_normalises_with_whole_image_statistics():
    dataset = EllipseDataset((42, 58), num_images=1)
    padded = padded_shape((42, 58), 4, (1, 1))
    assert padded == (44, 60)
    block = read_block(dataset, 0, Decomposition((1, 1)), padded, Augment.identity(2),
                       "zscore", torch.float64)  # fmt: skip
    assert block.valid.sum() == 42 * 58 and not block.valid[42:].any()
    inside = block.image[0][block.valid]
    assert inside.mean().item() == pytest.approx(0, abs=1e-9)
    assert inside.std(unbiased=False).item() == pytest.approx(1, abs=1e-9)
    assert (block.image[0][~block.valid] == 0).all()
    assert dataclasses.is_dataclass(block)


# -- metrics as MONAI defines them ------------------------------------------------------------


def test_dice_tracker_equals_monai_dice_metric_on_classes_and_regions():
    from monai.metrics import DiceMetric

    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (3, 20, 24), generator=gen)
    pred = torch.where(torch.rand(3, 20, 24, generator=gen) < 0.7, label,
                       torch.randint(0, 4, (3, 20, 24), generator=gen))  # fmt: skip
    label[1][label[1] == 3] = 0  # an image without class 3: left out, as MONAI does
    regions = {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing_tumour": [3]}
    tracker = DiceTracker(4, regions)
    tracker.update(pred, label, torch.ones_like(label, dtype=torch.bool), Decomposition((1, 1)))
    got = tracker.compute()

    def monai(masks_pred, masks_true):
        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
        metric(masks_pred.float(), masks_true.float())
        return metric.aggregate().tolist()

    onehot = torch.nn.functional.one_hot
    per_class = monai(onehot(pred, 4).movedim(-1, 1)[:, 1:], onehot(label, 4).movedim(-1, 1)[:, 1:])
    for c, want in enumerate(per_class, start=1):
        assert got[f"dice_class{c}"] == pytest.approx(want, rel=1e-6)
    for name, labels in regions.items():
        members = torch.tensor(labels)
        (want,) = monai(torch.isin(pred, members)[:, None], torch.isin(label, members)[:, None])
        assert got[f"dice_{name}"] == pytest.approx(want, rel=1e-6)
    assert got["dice_mean"] == pytest.approx(sum(per_class) / 3, rel=1e-6)


def test_masked_losses_equal_the_losses_of_the_unpadded_image():
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 12, 10, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 12, 10), generator=gen)
    padded_logits = torch.nn.functional.pad(logits, (0, 6, 0, 4), value=7.0)
    padded_target = torch.nn.functional.pad(target, (0, 6, 0, 4), value=2)
    valid = torch.nn.functional.pad(torch.ones_like(target, dtype=torch.bool), (0, 6, 0, 4))
    dec = Decomposition((1, 1))
    got = cross_entropy(padded_logits, padded_target, dec, valid=valid) + soft_dice_loss(
        padded_logits, padded_target, dec, valid=valid
    )
    want = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target[:, None])
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_replicas_with_different_numbers_of_validation_images(tmp_path):
    # One validation image for two data replicas: one of them validates nothing.
    cfg = _config(str(tmp_path), "parallel.data=2", "data.num_images=4", "train.steps=2",
                  "train.batch_size=1", "train.accumulate=1", "train.dtype=float32")  # fmt: skip
    history, _ = _run(cfg, 2)
    assert "dice_mean" in history[-1] and history[-1]["val_loss"] > 0


@pytest.mark.parametrize(
    "memory",
    [["memory.checkpoint=true"], ["memory.swap=all", "memory.checkpoint=true"]],
    ids=["checkpoint", "swap+checkpoint"],
)
def test_memory_savers_train_like_one_process(memory, single_run, tmp_path):
    """Checkpointing and swapping under the spatial engine: the same losses, metrics, weights
    and BatchNorm running statistics (each batch counted once) as one plain process."""
    cfg = _config(str(tmp_path), "parallel.grid=[1,2]", *memory)
    _assert_same_run(_run(cfg, 2), single_run)
