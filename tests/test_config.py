"""Run configs load from YAML plus ``key=value`` overrides, refuse bad input with one line
that names the key and the fix, and round-trip through the YAML saved next to a run."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from haloseg.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    load_config,
    save_config,
)
from haloseg.errors import ConfigError

# Run configs; the search spaces of `haloseg tune` (search-*.yaml) have tests of their own.
CONFIGS = sorted(
    p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
    if not p.name.startswith("search-")
)  # fmt: skip
TINY = [
    "data.shape=[32, 32]", "data.num_images=4", "train.steps=2", "train.val_every=1",
    "model.depth=2", "model.base_channels=4", "device=cpu",
]  # fmt: skip


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _refused(path: Path | None, overrides: list[str], match: str) -> str:
    """The message of the ``ConfigError`` loading refuses with; always one line."""
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading ------------------------------------------------------------------------------


def test_yaml_then_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        "name: exp\n"
        "data:\n  shape: [64, 48]\n  regions: {fg: [1, 2]}\n"
        "train:\n  steps: 10\n  lr: 1.0e-2\n",
    )
    cfg = load_config(path, ["train.steps=7", "model.norm=group", "parallel.grid=[1, 2]"])
    assert cfg.name == "exp" and cfg.output_dir == str(Path("runs") / "exp")
    assert cfg.data.shape == [64, 48] and cfg.data.regions == {"fg": [1, 2]}
    assert cfg.train.steps == 7  # the override wins over the file
    assert cfg.train.lr == 1e-2
    assert cfg.model == ModelConfig(norm="group")
    assert cfg.parallel == ParallelConfig(grid=[1, 2])
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep defaults


def test_overrides_without_a_file():
    cfg = load_config(None, ["name=x", "output_dir=/tmp/out", "data.pad=false"])
    assert cfg == RunConfig(name="x", output_dir="/tmp/out", data=DataConfig(pad=False))
    assert load_config(None) == RunConfig()


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "# nothing set\n")) == RunConfig()


@pytest.mark.parametrize("spelling", ["1e-3", "1E-3", "+1.0e-3", ".001"])
def test_floats_without_a_dot_are_floats(tmp_path, spelling):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; the loader takes it as the float it means.
    assert load_config(None, [f"train.lr={spelling}"]).train.lr == pytest.approx(1e-3)
    path = _yaml(tmp_path, f"train:\n  lr: {spelling}\n")
    assert load_config(path).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.output_dir == str(Path("runs") / path.stem)
    if cfg.data.kind == "synthetic":
        assert len(cfg.parallel.grid or []) in (0, len(cfg.data.shape))
    # The launch command in the file's header starts as many processes as the config needs.
    text = path.read_text()
    nodes = re.search(r"--nnodes (\d+)", text)
    per_node = re.search(r"--nproc-per-node (\d+)", text)
    if per_node:
        launched = int(per_node.group(1)) * (int(nodes.group(1)) if nodes else 1)
        assert launched == cfg.parallel.size


def test_example_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"ellipses-2d", "msd-brain-tumour"}


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("modle.depth=2", r"unknown config key 'modle'; did you mean 'model'\?"),
        ("devise=cpu", r"unknown config key 'devise'; did you mean 'device'\?"),
        ("train.stepz=2", r"unknown config key 'train.stepz'; did you mean 'steps'\?"),
        ("data.shpae=[8, 8]", r"unknown config key 'data.shpae'; did you mean 'shape'\?"),
        ("parallel.xyz=1", r"unknown config key 'parallel.xyz'; known keys: grid, data"),
    ],
)
def test_unknown_key_on_the_command_line(override, match):
    _refused(None, [override], match)


def test_unknown_key_in_yaml(tmp_path):
    _refused(_yaml(tmp_path, "tarin:\n  steps: 3\n"), [], r"'tarin'; did you mean 'train'\?")
    path = _yaml(tmp_path, "model:\n  base_chanels: 8\n")
    _refused(path, [], r"'model.base_chanels'; did you mean 'base_channels'\?")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.steps=abc", r"train.steps='abc' is not of type int"),
        ("train.steps=2.5", r"train.steps=2.5 is not of type int"),
        ("train.steps=true", r"train.steps=True is not of type int"),
        ("train.steps=1e3", r"train.steps='1e3' is not of type int"),
        ("train.lr=fast", r"train.lr='fast' is not of type float"),
        ("data.shape=[32, x]", r"data.shape=\[32, 'x'\] is not of type list\[int\]"),
        ("data.shape=32", r"data.shape=32 is not of type list\[int\]"),
        ("data.pad=maybe", r"data.pad='maybe' is not of type bool"),
        ("data.regions=[1, 2]", r"data.regions=\[1, 2\] is not of type dict"),
        ("name=5", r"name=5 is not of type str"),
        ("data=5", r"data must be a mapping, got 5"),
    ],
)
def test_wrong_types(override, match):
    _refused(None, [override], match)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("device=tpu", r"device='tpu' is not one of auto, cpu, cuda"),
        ("data.kind=png", r"data.kind='png' is not one of synthetic, msd, nnunet, tiff, zarr"),
        ("data.normalize=minmax", r"data.normalize='minmax' is not one of"),
        ("model.preset=huge", r"model.preset='huge' is not one of small, medium, large"),
        ("model.norm=layer", r"model.norm='layer' is not one of batch"),
        ("model.upsampling=cubic", r"model.upsampling='cubic' is not one of"),
        ("train.schedule=linear", r"train.schedule='linear' is not one of cosine, constant"),
        ("train.dtype=float16", r"train.dtype='float16' is not one of float32, float64"),
    ],
)
def test_bad_choices(override, match):
    _refused(None, [override], match)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.steps=0", r"train.steps=0 must be > 0"),
        ("train.lr=-1.0", r"train.lr=-1.0 must be > 0"),
        ("train.lr=.nan", r"train.lr=nan must be > 0"),
        ("train.weight_decay=-0.1", r"train.weight_decay=-0.1 must be >= 0"),
        ("train.seed=-1", r"train.seed=-1 must be >= 0"),
        ("data.seed=-1", r"data.seed=-1 must be >= 0"),
        ("data.noise=-0.5", r"data.noise=-0.5 must be >= 0"),
        ("train.dice_weight=-1", r"train.dice_weight=-1 must be >= 0"),
        ("data.val_fraction=1.0", r"data.val_fraction=1.0 must be in \[0, 1\)"),
        ("data.shape=[4, 4]", r"data.shape=\[4, 4\] must be 2 or 3 sides of at least 8"),
        ("data.num_classes=1", r"data.num_classes=1 must be >= 2"),
        ("data.kind=msd", r"data.kind='msd' needs data.path"),
        ("parallel.grid=[0, 2]", r"parallel.grid=\[0, 2\] must be positive extents"),
        ("parallel.data=0", r"parallel.data=0 must be > 0"),
    ],
)
def test_out_of_range(override, match):
    _refused(None, [override], match)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _yaml(tmp_path, "name: x\ntrain:\n  steps: [1,\n")
    message = _refused(path, [], r"is not valid YAML at line \d+, column \d+: ")
    assert str(path) in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    _refused(_yaml(tmp_path, "- a\n- b\n"), [], r"must hold a mapping of sections")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _refused(missing, [], r"does not exist")
    assert str(missing) in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.steps", r"override 'train.steps' is not key=value, e.g. train.steps=100"),
        ("=3", r"override '=3' is not key=value"),
        ("data.shape=[32,", r"override 'data.shape=\[32,' is not valid YAML at line 1"),
        ("name=x: y: z", r"override 'name=x: y: z' is not valid YAML"),
    ],
)
def test_override_syntax(override, match):
    _refused(None, [override], match)


def test_override_into_a_value_that_is_not_a_section(tmp_path):
    path = _yaml(tmp_path, "data:\n  shape: [32, 32]\n")
    _refused(path, ["data.shape.x=1"], r"override 'data.shape.x': 'shape' is not a section")


# --- saving -------------------------------------------------------------------------------


def test_save_config_round_trips(tmp_path):
    cfg = RunConfig(
        name="round", output_dir=str(tmp_path / "out"), device="cpu",
        data=DataConfig(kind="msd", path="/data/x", num_classes=4, shape=[16, 16, 8],
                        normalize="zscore_nonzero", regions={"wt": [1, 2, 3], "et": [3]}),
        model=ModelConfig(preset="medium", depth=3, norm="instance"),
        parallel=ParallelConfig(grid=[1, 2, 2], data=2),
        train=TrainConfig(steps=5, lr=1e-4, amp=True, dtype="float64"),
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["data"]["regions"] == {"wt": [1, 2, 3], "et": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left
    save_config(RunConfig(), path)  # replaces the file
    assert load_config(path) == RunConfig()


def test_training_run_saves_the_resolved_config(tmp_path):
    from haloseg.training import train

    cfg = load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", "train.lr=1e-3"])
    metrics = train(cfg, progress=False, previews=0)
    assert metrics["steps"] == 2 and math.isfinite(metrics["val_loss"])
    saved = tmp_path / "run" / "config.yaml"
    assert load_config(saved) == cfg
    assert yaml.safe_load(saved.read_text())["output_dir"] == str(tmp_path / "run")
