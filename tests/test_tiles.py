"""Overlap-tile training (``parallel.mode=tiles``): the gradients of every tile add up to the
whole image's exactly (fp64) when the halo covers the receptive field, and not when it is
one alignment step short; ``haloseg train`` over tiles equals one process on every weight
and its run serves ``haloseg infer``; each process reads only its tile; networks with
statistics over the image are refused by layer, and frozen BatchNorm stays frozen."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from haloseg.cli.main import main
from haloseg.config import load_config
from haloseg.data import EllipseDataset
from haloseg.errors import ConfigError
from haloseg.geometry import box_volume
from haloseg.geometry.overlap import tile_box
from haloseg.inference.run import load_model
from haloseg.models import UNet
from haloseg.parallel import Decomposition, cross_entropy, soft_dice_loss
from haloseg.parallel.gradients import GradientSum
from haloseg.parallel.spawn import run_distributed
from haloseg.training.checkpoint import load_checkpoint
from haloseg.training.freeze import freeze_batch_norm
from haloseg.training.loop import build_trainer
from haloseg.training.samples import Augment, padded_shape, read_block
from haloseg.training.tiles import local_receptive_field, read_tile_block

# --- gradients of the tiles against the whole image ---------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    """Image shape: not a multiple of the alignment (padding) nor of grid x alignment."""
    grid: tuple[int, ...]
    norm: str = "none"
    upsampling: str = "transposed"
    short: int = 0
    """Alignment steps taken off the derived halo (a halo too small to be exact)."""


CASES = [
    Case("2d", (106, 90), (2, 2)),
    Case("2d-frozen-batchnorm", (106, 90), (2, 2), norm="batch"),
    Case("2d-bilinear", (150, 134), (2, 2), upsampling="linear"),
    Case("3d", (8, 62, 58), (1, 2, 2)),
    Case("3d-frozen-batchnorm", (8, 62, 58), (1, 2, 2), norm="batch"),
]
SHORT = [
    Case("2d-short-halo", (106, 90), (2, 2), short=1),
    Case("3d-short-halo", (8, 62, 58), (1, 2, 2), short=1),
]


def _model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = UNet(spatial_dims=len(case.shape), in_channels=2, out_channels=3, depth=2,
                 base_channels=4, norm=case.norm, upsampling=case.upsampling).double()  # fmt: skip
    if case.norm == "batch":
        # Statistics and affine weights far from the identity, as a pre-trained network's.
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                for t in (m.running_mean, m.weight, m.bias):
                    t.data.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        freeze_batch_norm(model)
    return model.train()


def _data(case: Case) -> tuple[EllipseDataset, Augment]:
    dataset = EllipseDataset(list(case.shape), num_images=2, num_classes=3, in_channels=2,
                             noise=0.3, seed=3)  # fmt: skip
    flips = tuple(d % 2 == 0 for d in range(len(case.shape)))
    return dataset, Augment(tuple(range(len(case.shape))), flips)


def _loss(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, dec) -> torch.Tensor:
    """The trainer's loss (cross-entropy + soft Dice over the whole image)."""
    ce = cross_entropy(logits, label, dec, valid=valid)
    return ce + soft_dice_loss(logits, label, dec, valid=valid)


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _tile_gradients(cases: list[Case]) -> list[dict]:
    """Worker: each rank trains on its tile; the gradients summed over the tiles."""
    out = []
    for case in cases:
        model = _model(case)
        rf = local_receptive_field(model, len(case.shape))
        halo = tuple(h - case.short * rf.alignment for h in rf.halo)
        dec = Decomposition(case.grid)
        dec.align = rf.alignment
        GradientSum(list(model.parameters()), dec)
        dataset, aug = _data(case)
        padded = padded_shape(case.shape, rf.alignment, case.grid)
        blocks = [read_tile_block(dataset, i, dec, padded, aug, "zscore", torch.float64,
                                  halo=halo) for i in range(2)]  # fmt: skip
        image = torch.stack([b.image for b in blocks])
        logits = blocks[0].crop(model(image))
        label, valid = (torch.stack([getattr(b, k) for b in blocks]) for k in ("label", "valid"))
        _loss(logits, label, valid, dec).backward()
        tile = tile_box(dec.box(padded), halo, padded)
        # NumPy: torch tensors would travel as shared memory the exiting worker takes along.
        out.append({"grads": _grads(model).numpy(), "logits": logits.detach().numpy(),
                    "core": dec.box(padded), "halo": halo, "rf": rf,
                    "tile": tuple(hi - lo for lo, hi in tile), "padded": padded})  # fmt: skip
    return out


def _whole_image(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameter gradients, logits) of one process on the whole (padded) image: what
    single-process training computes."""
    model = _model(case)
    dec = Decomposition((1,) * len(case.shape))
    dec.align = 2**model.depth
    dataset, aug = _data(case)
    padded = padded_shape(case.shape, dec.align, case.grid)
    blocks = [read_block(dataset, i, dec, padded, aug, "zscore", torch.float64) for i in range(2)]
    image, label, valid = (torch.stack([getattr(b, k) for b in blocks])
                           for k in ("image", "label", "valid"))  # fmt: skip
    logits = model(image)
    _loss(logits, label, valid, dec).backward()
    return _grads(model), logits.detach()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _worst(ranks: list[dict], want: torch.Tensor) -> float:
    """Largest difference of a logit over the cores from the whole image's, relative to
    the largest logit."""
    got = torch.zeros_like(want)
    for r in ranks:
        got[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in r["core"]))] = (
            torch.from_numpy(r["logits"])
        )
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def tiled() -> dict[str, list[dict]]:
    """Every case (exact and short halo) on a 4-process group, in one start."""
    ranks = run_distributed(_tile_gradients, 4, CASES + SHORT, timeout=300)
    for r in ranks:
        for row in r:
            row["grads"] = torch.from_numpy(row["grads"])
    return {c.name: [r[i] for r in ranks] for i, c in enumerate(CASES + SHORT)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tile_gradients_equal_whole_image_gradients(case, tiled):
    ranks, (want, logits) = tiled[case.name], _whole_image(case)
    first = ranks[0]
    # The halo matters: every tile is smaller than the padded image along a split axis, and
    # the halo is the receptive field's radius rounded up to the alignment.
    assert all(r["tile"] != r["padded"] for r in ranks)
    radius = max(max(lo, hi) for lo, hi in first["rf"].radius)
    assert max(first["halo"]) - first["rf"].alignment < radius <= max(first["halo"])
    for r in ranks:  # every rank holds the same sum
        torch.testing.assert_close(r["grads"], first["grads"], rtol=0, atol=0)
    assert _relative(first["grads"], want) < 1e-10
    assert _worst(ranks, logits) < 1e-10


@pytest.mark.parametrize("case", SHORT, ids=lambda c: c.name)
def test_a_halo_short_of_the_receptive_field_is_not_exact(case, tiled):
    ranks, (want, logits) = tiled[case.name], _whole_image(case)
    # The exactness test above would fail: its gradients differ beyond its tolerance, and
    # logits at the cores' edges by a hundred times more.
    assert _relative(ranks[0]["grads"], want) > 1e-10
    assert _worst(ranks, logits) > 1e-8


# --- refusals and frozen BatchNorm --------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "reason"),
    [("batch", "BatchNorm in training mode normalises with batch statistics"),
     ("instance", "InstanceNorm normalises with statistics over the whole image"),
     ("group", "GroupNorm normalises with statistics over the whole image")],
)  # fmt: skip
def test_networks_with_image_statistics_are_refused(norm, reason):
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=4,
                 norm=norm).train()  # fmt: skip
    with pytest.raises(ConfigError) as e:
        local_receptive_field(model, 2)
    message = str(e.value)
    assert "\n" not in message and "'encoder.0.1'" in message and reason in message
    assert "parallel.mode=halo" in message
    assert ("train.freeze_norm=true" in message) == (norm == "batch")
    assert "haloseg infer" not in message  # receptive_field's advice is for inference


def test_global_pooling_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ConfigError, match=r"'1': adaptive pooling reads the whole image"):
        local_receptive_field(model, 2)


def test_frozen_batchnorm_stays_frozen_through_train():
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_channels=4)
    names = freeze_batch_norm(model)
    assert names and names[0] == "encoder.0.1"
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(2, 1, 16, 16)).square().sum().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)
    assert local_receptive_field(model, 2).halo == (24, 24)


def test_freeze_norm_without_batchnorm_is_refused():
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, depth=2, norm="group")
    with pytest.raises(ConfigError, match=r"no BatchNorm layer; drop train.freeze_norm"):
        freeze_batch_norm(model)


def test_tiles_mode_with_instance_norm_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text("name: tiny\n")
    argv = ["train", str(tmp_path / "tiny.yaml"), "data.shape=[32, 32]", "data.num_images=4",
            "model.depth=2", "model.base_channels=4", "model.norm=instance", "device=cpu",
            "parallel.mode=tiles", f"output_dir={tmp_path / 'run'}", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "InstanceNorm normalises" in err[0] and "parallel.mode=halo" in err[0]
    assert not (tmp_path / "run").exists()


# --- each process reads its tile only -----------------------------------------------------


class Recording:
    """A dataset that records every box read."""

    def __init__(self, dataset) -> None:
        self.dataset, self.boxes = dataset, []
        for name in ("spatial_dims", "in_channels", "num_classes"):
            setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def info(self, index):
        return self.dataset.info(index)

    def read(self, index, box):
        self.boxes.append((index, [tuple(b) for b in box]))
        return self.dataset.read(index, box)


def _reads(cfg) -> dict:
    """Worker: the boxes this rank reads for the first training batch, and its tile."""
    trainer = build_trainer(cfg)
    subset = trainer.train_set
    subset.dataset = Recording(subset.dataset)
    items = trainer._draw(0)
    batch = trainer.batch(subset, items)
    dec, halo = trainer.layout.dec, trainer.layout.halo
    expected = []
    for index, aug in items:
        shape = subset.info(index).shape
        padded = trainer.padded(aug.shape(shape))
        tile = tile_box(dec.box(padded), halo, padded)
        inside = [(min(lo, n), min(hi, n)) for (lo, hi), n in zip(tile, aug.shape(shape))]
        expected.append((subset.indices[index], aug.source_box(inside, shape)))
    return {"read": subset.dataset.boxes, "expected": expected, "image": tuple(batch.image.shape),
            "label": tuple(batch.label.shape), "shape": subset.info(0).shape}  # fmt: skip


def _tiny(output: Path, *extra: str):
    return load_config(None, [
        f"output_dir={output}", "device=cpu", "data.shape=[74, 62]", "data.num_images=4",
        "model.depth=2", "model.base_channels=4", "model.norm=none", "parallel.mode=tiles",
        "train.steps=1", "train.val_every=1", "train.batch_size=2", *extra,
    ])  # fmt: skip


def test_each_process_reads_only_its_tile_and_halo(tmp_path):
    cfg = _tiny(tmp_path / "run", "parallel.grid=[1, 2]")
    ranks = run_distributed(_reads, 2, cfg, timeout=300)
    whole = int(np.prod(ranks[0]["shape"]))
    for r in ranks:
        assert r["read"] == r["expected"]
        read = [box_volume(box) for _, box in r["read"]]
        assert max(read) < whole  # a tile, not the image
        assert r["image"][2:] != r["label"][1:]  # the image holds a halo the label lacks
    # The tiles together cover every voxel of each image.
    for index in {i for i, _ in ranks[0]["read"]}:
        seen = np.zeros(ranks[0]["shape"], dtype=bool)
        for r in ranks:
            for i, box in r["read"]:
                if i == index:
                    seen[tuple(slice(lo, hi) for lo, hi in box)] = True
        assert seen.all()


# --- haloseg train over tiles equals one process; haloseg infer serves it -------------------


def _train_cli(run: Path, world: int, *overrides: str) -> None:
    config = run.parent / "tiny.yaml"
    config.write_text("name: tiny\n")
    argv = ["train", str(config), f"output_dir={run}", "device=cpu",
            "data.shape=[74, 62]", "data.num_images=4", "model.depth=2",
            "model.base_channels=4", "train.dtype=float64", "train.steps=1",
            "train.val_every=1", "train.batch_size=2", "train.warmup_steps=0",
            *overrides, "--no-progress"]  # fmt: skip
    if world == 1:
        assert main(argv) == 0
    else:
        assert run_distributed(main, world, argv, timeout=300) == [0] * world


def _assert_same_weights(got: Path, want: Path) -> None:
    a, b = load_checkpoint(got / "checkpoints"), load_checkpoint(want / "checkpoints")
    for key in ("loss", "val_loss", "dice_mean"):
        assert a["history"][0][key] == pytest.approx(b["history"][0][key], rel=1e-10), key
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        assert value.dtype == torch.float64 or not value.is_floating_point(), key
        torch.testing.assert_close(a["model"][key], value, rtol=1e-10, atol=1e-12, msg=key)


def _assert_frozen(run: Path) -> None:
    """The running statistics are still the initial ones after a step."""
    weights = load_checkpoint(run / "checkpoints")["model"]
    for suffix, initial in (("running_mean", 0.0), ("running_var", 1.0)):
        stats = [v for k, v in weights.items() if k.endswith(suffix)]
        assert stats and all(torch.equal(v, torch.full_like(v, initial)) for v in stats)


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A frozen-BatchNorm U-Net trained one step on one process and on 2x2 tiles."""
    root = tmp_path_factory.mktemp("tiles")
    frozen = ("model.norm=batch", "train.freeze_norm=true")
    _train_cli(root / "one", 1, "parallel.grid=null", *frozen)
    _train_cli(root / "tiles", 4, "parallel.grid=[2,2]", "parallel.mode=tiles", *frozen)
    return root / "tiles", root / "one"


def test_one_step_over_2x2_tiles_equals_one_process(frozen_runs):
    tiles, one = frozen_runs
    _assert_same_weights(tiles, one)
    _assert_frozen(tiles)
    assert json.loads((tiles / "metrics.json").read_text())["grid"] == [2, 2]


def test_infer_serves_a_tiles_run(frozen_runs, tmp_path):
    tiles, _ = frozen_runs
    image = np.random.default_rng(1).normal(size=(1, 48, 44)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    out = tmp_path / "labels.npy"
    argv = ["infer", "--checkpoint", str(tiles), "--input", str(tmp_path / "image.npy"),
            "--output", str(out), "--tile", "16", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    model, _ = load_model(tiles)
    x = torch.from_numpy(image.astype(np.float64))
    x = (x - x.mean()) / x.std(unbiased=False)
    with torch.no_grad():
        want = model(x[None])[0].argmax(0)
    np.testing.assert_array_equal(np.load(out), want.numpy())


@pytest.mark.slow
def test_tiles_with_data_replicas_equal_one_process(frozen_runs, tmp_path):
    """2 replicas x 1x2 tiles: DDP's hook sums over the tiles, averages over the replicas."""
    _, one = frozen_runs
    run = tmp_path / "replicas"
    _train_cli(run, 4, "parallel.grid=[1,2]", "parallel.data=2", "parallel.mode=tiles",
               "train.batch_size=1", "model.norm=batch", "train.freeze_norm=true")  # fmt: skip
    _assert_same_weights(run, one)


@pytest.mark.slow
def test_frozen_batchnorm_in_halo_mode_equals_one_process(frozen_runs, tmp_path):
    """train.freeze_norm holds in halo mode too: the partitioned BatchNorm stays in eval."""
    _, one = frozen_runs
    run = tmp_path / "halo"
    _train_cli(run, 4, "parallel.grid=[2,2]", "model.norm=batch", "train.freeze_norm=true")
    _assert_same_weights(run, one)
    _assert_frozen(run)
