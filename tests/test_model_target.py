"""Networks of other libraries from a config (``model.target`` + ``model.kwargs``).

Bad targets and arguments are refused when the config is made, as a ``ConfigError`` and, from
``haloseg train``, as exit code 2 with one line naming the value and the fix. MONAI's
SegResNet trained over a 1x2 grid of processes equals one process in fp64, and
``haloseg infer`` serves it from the run folder alone. segmentation_models_pytorch's Unet
goes the same way where that package is installed (``-m smp``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from haloseg.cli.main import main
from haloseg.config import ModelConfig, load_config
from haloseg.errors import ConfigError
from haloseg.inference.run import load_model
from haloseg.models import build_target, unet_preset
from haloseg.parallel.spawn import run_distributed
from haloseg.training.checkpoint import load_checkpoint

# Tiny 2-D SegResNet: 4 filters, one down-sampling. GroupNorm's default 8 groups do not
# divide 4 channels, hence 2 groups.
SEGRESNET = """\
name: segresnet
device: cpu
data:
  shape: [32, 32]
  num_images: 4
  num_classes: 3
model:
  target: monai.networks.nets.SegResNet
  kwargs:
    init_filters: 4
    blocks_down: [1, 1]
    blocks_up: [1]
    norm: [GROUP, {num_groups: 2}]
train:
  steps: 2
  val_every: 1
  warmup_steps: 1
  dtype: float64
"""

# segmentation_models_pytorch's Unet on 2-channel images, ResNet-18 encoder of 3 stages
# (down-sampling factor 8), no pretrained weights (nothing to download).
SMP_UNET = """\
name: smp-unet
device: cpu
data:
  shape: [32, 32]
  num_images: 4
  num_classes: 3
  in_channels: 2
model:
  target: segmentation_models_pytorch.Unet
  kwargs:
    encoder_name: resnet18
    encoder_weights: null
    encoder_depth: 3
    decoder_channels: [16, 8, 4]
    in_channels: 2
    classes: 3
train:
  steps: 2
  val_every: 1
  warmup_steps: 1
  dtype: float64
"""


def _config(folder: Path, text: str = SEGRESNET) -> Path:
    path = folder / "run.yaml"
    path.write_text(text)
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], *names: str) -> None:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("haloseg: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


# --- refused when the config is made ------------------------------------------------------

REFUSED = {
    "not dotted": (["model.target=SegResNet"], ["model.target='SegResNet'", "dotted path"]),
    "unknown module": (
        ["model.target=no_such_package_x.nets.MyNet"],
        ["no_such_package_x", "pip install no_such_package_x"],
    ),
    "unknown class": (
        ["model.target=monai.networks.nets.SegResNett"],
        ["monai.networks.nets has no 'SegResNett'", "did you mean 'SegResNet'"],
    ),
    "not a module class": (
        ["model.target=monai.networks.one_hot"],
        ["monai.networks.one_hot", "not a torch.nn.Module subclass"],
    ),
    "unknown kwarg": (
        ["model.kwargs.init_filter=4"],
        ["model.kwargs.init_filter", "did you mean 'init_filters'", "blocks_down"],
    ),
    "out_channels against the classes": (
        ["model.kwargs.out_channels=2"],
        ["model.kwargs.out_channels=2", "3 classes", "drop model.kwargs.out_channels"],
    ),
    "in_channels against the images": (
        ["model.kwargs.in_channels=4"],
        ["model.kwargs.in_channels=4", "1 channel"],
    ),
    "spatial_dims against the images": (
        ["model.kwargs.spatial_dims=3"],
        ["model.kwargs.spatial_dims=3", "2-D"],
    ),
    "preset option": (["model.depth=2"], ["model.depth=2", "model.target", "drop it"]),
    "preset": (["model.preset=small"], ["model.preset='small'", "model.preset=null"]),
    "kwargs without target": (["model.target=null"], ["model.kwargs=", "model.target only"]),
    "level checkpointing": (["memory.checkpoint=true"], ["memory.checkpoint=true", "U-Net"]),
}


@pytest.mark.parametrize("overrides,names", REFUSED.values(), ids=REFUSED.keys())
def test_config_refuses(overrides, names, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path), overrides)
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize("overrides,names", REFUSED.values(), ids=REFUSED.keys())
def test_train_refuses_in_one_line(overrides, names, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", str(_config(tmp_path)), f"output_dir={run}", *overrides, "--no-progress"]
    assert main(argv) == 2
    _one_error_line(capsys, *names)
    assert not run.exists()


def test_constructor_failure_is_one_line(tmp_path, capsys):
    # SegResNet's default of 8 groups does not divide its 4 first channels.
    run = tmp_path / "run"
    argv = ["train", str(_config(tmp_path)), f"output_dir={run}",
            "model.kwargs.norm=[GROUP, {num_groups: 8}]", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    _one_error_line(capsys, "model.target=monai.networks.nets.SegResNet", "could not be built",
                    "divisible by num_groups")  # fmt: skip
    assert not run.exists()


@pytest.mark.skipif(importlib.util.find_spec("segmentation_models_pytorch") is not None,
                    reason="segmentation_models_pytorch is installed")  # fmt: skip
def test_missing_smp_names_the_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"pip install 'haloseg\[smp\]'"):
        load_config(_config(tmp_path, SMP_UNET))


# --- the data's arguments -----------------------------------------------------------------


class SmpLike(nn.Module):
    """A constructor with segmentation_models_pytorch's names: in_channels and classes."""

    def __init__(self, encoder_name: str = "resnet34", in_channels: int = 3, classes: int = 1):
        super().__init__()
        self.encoder_name = encoder_name
        self.conv = nn.Conv2d(in_channels, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AnyArguments(nn.Module):
    """A constructor taking ``**kwargs``: any name, and none the data could fill."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs


def test_data_arguments_are_filled_where_left_out():
    model = ModelConfig(target=f"{__name__}.SmpLike", kwargs={"encoder_name": "resnet18"})
    entry = model.network(2, 4, 5)
    assert entry["kwargs"] == {"encoder_name": "resnet18", "in_channels": 4, "classes": 5}
    assert (entry["spatial_dims"], entry["in_channels"], entry["out_channels"]) == (2, 4, 5)
    net = build_target(entry["target"], entry["kwargs"])
    assert net.conv.in_channels == 4 and net.conv.out_channels == 5
    with pytest.raises(ConfigError, match=r"model.kwargs.classes=2 but the data has 5 classes"):
        ModelConfig(target=f"{__name__}.SmpLike", kwargs={"classes": 2}).network(2, 4, 5)


def test_a_constructor_with_kwargs_takes_any_argument():
    model = ModelConfig(target=f"{__name__}.AnyArguments", kwargs={"anything": 1})
    assert model.network(3, 1, 2)["kwargs"] == {"anything": 1}


def test_run_without_spec_still_loads(tmp_path):
    """A checkpoint of a haloseg older than run specs and targets: config and weights only."""
    net = unet_preset("small", spatial_dims=2, in_channels=1, out_channels=3, depth=2,
                      base_channels=4)  # fmt: skip
    config = {"model": {"preset": "small", "depth": 2, "base_channels": 4, "norm": None,
                        "upsampling": None},
              "data": {"normalize": "zscore"}, "train": {"dtype": "float32"}}  # fmt: skip
    torch.save({"model": net.state_dict(), "config": config}, tmp_path / "old.pt")
    loaded, spec = load_model(tmp_path / "old.pt")
    assert spec.model["preset"] == "small" and spec.num_classes == 3
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


# --- trained over processes, served from the run folder -----------------------------------


def _train(config: Path, run: Path, world: int, *overrides: str) -> None:
    """``haloseg train CONFIG`` on ``world`` processes (each rank runs the CLI)."""
    argv = ["train", str(config), f"output_dir={run}", *overrides, "--no-progress"]
    codes = run_distributed(main, world, argv, timeout=600)
    assert codes == [0] * world


def _assert_same_training(two: Path, one: Path) -> None:
    got, want = load_checkpoint(two / "checkpoints"), load_checkpoint(one / "checkpoints")
    assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]] == [1, 2]
    for a, b in zip(got["history"], want["history"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), key
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        assert value.dtype == torch.float64 or not value.is_floating_point(), key
        torch.testing.assert_close(got["model"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert json.loads((two / "metrics.json").read_text())["grid"] == [1, 2]


def _zscore64(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float64))
    mean = x.mean(dim=(1, 2), keepdim=True)
    return (x - mean) / x.std(dim=(1, 2), keepdim=True, unbiased=False)


def _assert_infer_serves(
    run: Path, tmp_path: Path, channels: int, target: str, *extra: str
) -> None:
    """``haloseg infer --checkpoint RUN`` writes the labels of one whole-image forward pass
    of the run's model, rebuilt from its spec alone."""
    image = np.random.default_rng(1).normal(size=(channels, 48, 40)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    out = tmp_path / "labels.npy"
    argv = ["infer", "--checkpoint", str(run), "--input", str(tmp_path / "image.npy"),
            "--output", str(out), "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0
    labels = np.load(out)
    assert labels.shape == (48, 40) and labels.dtype == np.uint8
    model, spec = load_model(run)
    assert spec.model["target"] == target and type(model).__name__ == target.split(".")[-1]
    with torch.no_grad():
        want = model(_zscore64(image)[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels, want)


@pytest.fixture(scope="module")
def segresnet_runs(tmp_path_factory):
    """The tiny SegResNet trained on one process and over a 1x2 grid of two."""
    root = tmp_path_factory.mktemp("segresnet")
    config = _config(root)
    _train(config, root / "one", 1)
    _train(config, root / "two", 2, "parallel.grid=[1, 2]")
    return root / "two", root / "one"


def test_segresnet_over_two_processes_equals_one(segresnet_runs):
    _assert_same_training(*segresnet_runs)


def test_infer_serves_the_segresnet_run(segresnet_runs, tmp_path):
    two, _ = segresnet_runs
    spec = json.loads((two / "model.json").read_text())
    # The run folder says how to build the network: the data's arguments filled in.
    assert spec["model"]["kwargs"] == {
        "init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1],
        "norm": ["GROUP", {"num_groups": 2}],
        "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
    }  # fmt: skip
    _assert_infer_serves(two, tmp_path, 1, "monai.networks.nets.SegResNet")


@pytest.mark.smp
def test_smp_unet_over_two_processes_equals_one_and_is_served(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    config = _config(tmp_path, SMP_UNET)
    # Its decoder up-samples with F.interpolate(size=skip's shape) inside forward: the
    # spatial engine partitions that call.
    _train(config, tmp_path / "one", 1)
    _train(config, tmp_path / "two", 2, "parallel.grid=[1, 2]")
    _assert_same_training(tmp_path / "two", tmp_path / "one")
    # BatchNorm in eval mode is local: exact tiles with the receptive field's halo.
    _assert_infer_serves(tmp_path / "two", tmp_path, 2, "segmentation_models_pytorch.Unet",
                         "--tile", "16")  # fmt: skip
