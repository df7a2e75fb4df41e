"""Run configuration: nested dataclasses validated on construction, loaded from YAML plus
``key=value`` overrides, and saved next to every run's outputs."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from haloseg.data.normalize import NORMALIZE
from haloseg.errors import ConfigError

__all__ = [
    "DataConfig",
    "check_ignore_label",
    "MemoryConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "demo_config",
    "load_config",
    "timing_config",
    "save_config",
]

DATA_KINDS = ("synthetic", "msd", "nnunet", "tiff", "zarr")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def check_ignore_label(ignore_label: int | None, num_classes: int | None) -> None:
    """Refuse an ignore label that is one of the classes ``0..num_classes-1``."""
    if ignore_label is not None and num_classes is not None and ignore_label < num_classes:
        raise ConfigError(
            f"data.ignore_label={ignore_label} is inside the class range 0..{num_classes - 1}; "
            f"give a value >= {num_classes} (e.g. data.ignore_label=255)"
        )


def _positive(name: str, value: float, *, zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if zero else '> 0'}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are prepared."""

    kind: str = "synthetic"
    """synthetic | msd (Decathlon folder) | nnunet (nnU-Net v2 raw folder) | tiff (folder
    with images/ and labels/) | zarr."""
    path: str | None = None
    """Dataset folder or zarr store (not for synthetic)."""
    num_classes: int | None = None
    """Classes including background; read from the dataset where it says (MSD, zarr)."""
    shape: list[int] = field(default_factory=lambda: [128, 128])
    """Synthetic image shape (2-D or 3-D)."""
    num_images: int = 48
    """Synthetic images in all (training + validation)."""
    in_channels: int = 1
    """Synthetic image channels."""
    noise: float = 0.4
    """Synthetic noise standard deviation."""
    seed: int = 0
    """Synthetic data seed."""
    val_fraction: float = 0.25
    """Share of the samples held out for validation (the last ones)."""
    normalize: str = "zscore"
    """Per image and channel, with whole-image statistics: zscore | zscore_nonzero | none."""
    augment: bool = True
    """Random flips (and 90-degree turns of square planes), identical on every block."""
    pad: bool = True
    """Pad images the network or grid cannot split to the next valid size (padding is
    ignored by loss and metrics); if false, such images are an error naming valid sizes."""
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Named unions of labels scored as extra Dice metrics, e.g. BraTS WT: [1, 2, 3]."""
    ignore_label: int | None = None
    """Label value excluded from loss and metrics (e.g. 255 for nodata or unannotated
    voxels); must lie outside the classes 0..num_classes-1."""

    def __post_init__(self) -> None:
        _choice("data.kind", self.kind, DATA_KINDS)
        _choice("data.normalize", self.normalize, NORMALIZE)
        if self.kind != "synthetic" and not self.path:
            raise ConfigError(f"data.kind={self.kind!r} needs data.path (the dataset folder)")
        if len(self.shape) not in (2, 3) or min(self.shape) < 8:
            raise ConfigError(f"data.shape={self.shape} must be 2 or 3 sides of at least 8")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"data.num_classes={self.num_classes} must be >= 2")
        for name, labels in self.regions.items():
            if name == "mean" or name.startswith("class") or not labels:
                raise ConfigError(
                    f"data.regions[{name!r}]={labels}: a region needs a name other than 'mean' "
                    "or 'classN' (those are per-class metrics) and at least one label"
                )
        if self.ignore_label is not None:
            _positive("data.ignore_label", self.ignore_label, zero=True)
            check_ignore_label(self.ignore_label, self.num_classes)
        _positive("data.num_images", self.num_images)
        _positive("data.in_channels", self.in_channels)
        _positive("data.noise", self.noise, zero=True)
        _positive("data.seed", self.seed, zero=True)


@dataclass(kw_only=True)
class ModelConfig:
    """The U-Net: a preset, optionally with some of its settings replaced."""

    preset: str = "small"
    """small | medium | large."""
    depth: int | None = None
    """Down-sampling levels (preset's if unset)."""
    base_channels: int | None = None
    """Channels of the first level (preset's if unset)."""
    norm: str | None = None
    """batch | instance | group | none (preset's if unset)."""
    upsampling: str | None = None
    """transposed | nearest | linear (preset's if unset)."""

    def __post_init__(self) -> None:
        _choice("model.preset", self.preset, ("small", "medium", "large"))
        if self.norm is not None:
            _choice("model.norm", self.norm, ("batch", "instance", "group", "none"))
        if self.upsampling is not None:
            _choice("model.upsampling", self.upsampling, ("transposed", "nearest", "linear"))

    def overrides(self) -> dict[str, Any]:
        names = ("depth", "base_channels", "norm", "upsampling")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(kw_only=True)
class ParallelConfig:
    """How the processes are arranged: ``data`` replicas x a spatial ``grid`` each."""

    grid: list[int] | None = None
    """Spatial process grid, one extent per spatial dim (all ones if unset)."""
    data: int = 1
    """Data-parallel replicas; data x prod(grid) must equal the number of processes."""

    def __post_init__(self) -> None:
        if self.grid is not None and (not self.grid or min(self.grid) < 1):
            raise ConfigError(f"parallel.grid={self.grid} must be positive extents like [2, 2]")
        _positive("parallel.data", self.data)

    @property
    def size(self) -> int:
        return self.data * math.prod(self.grid or [1])


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 1
    """Images per data replica per micro-step."""
    accumulate: int = 1
    """Micro-steps whose gradients add up before each optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up before the cosine decay."""
    schedule: str = "cosine"
    """cosine | constant (after warm-up)."""
    dice_weight: float = 1.0
    """Weight of the soft Dice loss."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy loss."""
    amp: bool = False
    """bfloat16 autocast (GPU only; ignored on CPU)."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 | float64."""
    val_every: int = 50
    """Validate every this many steps (and at the end)."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (and at the end)."""
    log_every: int = 10
    """Log training loss to TensorBoard every this many steps."""
    seed: int = 0
    """Seeds weights, sample order and augmentation."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulate", "val_every", "checkpoint_every"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.lr", self.lr)
        _positive("train.log_every", self.log_every)
        for name in ("warmup_steps", "weight_decay", "dice_weight", "ce_weight", "seed"):
            _positive(f"train.{name}", getattr(self, name), zero=True)
        _choice("train.schedule", self.schedule, ("cosine", "constant"))
        _choice("train.dtype", self.dtype, ("float32", "float64"))


SWAP_POLICIES = ("none", "all", "skips", "min_bytes", "budget")


@dataclass(kw_only=True)
class MemoryConfig:
    """Memory savers: activation swapping to host memory and checkpointing per U-Net level."""

    swap: str = "none"
    """Saved activations to host: none | all | skips (the encoder levels that feed skip
    connections) | min_bytes (tensors of at least swap_min_bytes) | budget (what exceeds
    swap_budget)."""
    swap_min_bytes: int = 1 << 20
    """Smallest tensor swapped by the min_bytes policy."""
    swap_budget: str | None = None
    """Device bytes of saved activations kept before swapping starts, e.g. 20GB (budget)."""
    prefetch: int = 2
    """Swapped tensors brought back ahead of their use in backward."""
    checkpoint: bool = False
    """Keep only each U-Net level's input and recompute the level in backward."""
    device_memory: str | None = None
    """Memory of one device, for ``haloseg train --plan`` to say whether the run fits."""

    def __post_init__(self) -> None:
        _choice("memory.swap", self.swap, SWAP_POLICIES)
        _positive("memory.prefetch", self.prefetch, zero=True)
        _positive("memory.swap_min_bytes", self.swap_min_bytes)
        if self.swap == "budget" and self.swap_budget is None:
            raise ConfigError(
                "memory.swap=budget needs memory.swap_budget, e.g. memory.swap_budget=20GB"
            )
        if self.swap_budget is not None and self.swap != "budget":
            raise ConfigError(
                f"memory.swap_budget={self.swap_budget} applies to memory.swap=budget only "
                f"(memory.swap is {self.swap!r}); drop it or set memory.swap=budget"
            )
        from haloseg.inference.budget import parse_bytes

        if self.swap_budget is not None:
            parse_bytes(self.swap_budget)
        if self.device_memory is not None and parse_bytes(self.device_memory) == 0:
            raise ConfigError(f"memory.device_memory={self.device_memory} must be > 0, e.g. 80GB")


@dataclass(kw_only=True)
class RunConfig:
    """One training run."""

    name: str = "run"
    """Run name (used for the default output folder)."""
    output_dir: str | None = None
    """Run folder for config, checkpoints, metrics and logs (runs/NAME if unset)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(choices)}"


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    return isinstance(value, hint)


def _build(cls: type, values: Any, where: str) -> Any:
    """``cls`` from a nested mapping, refusing unknown keys with the closest known one."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_closest(str(key), list(fields))}")
        nested = _NESTED.get(key) if cls is RunConfig else None
        if nested is None:
            value = _exponent_float(value, hints[key])
        if nested is None and not _matches(value, hints[key]):
            raise ConfigError(f"{path}={value!r} is not of type {_type_name(hints[key])}")
        kwargs[key] = _build(nested, value, path) if nested else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


# PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string; YAML 1.2 reads a float.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_float(value: Any, hint: Any) -> Any:
    """``value`` as a float where it is a number like ``1e-3`` and ``hint`` takes floats."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value) and _matches(1.0, hint):
        return float(value)
    return value


def _yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML; a syntax error becomes one line naming ``what``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


_NESTED: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "memory": MemoryConfig,
}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """A ``RunConfig`` from a YAML file (or the defaults) and ``key=value`` overrides such as
    ``train.lr=1e-3`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        tree = _yaml(p.read_text(), f"config file {str(p)!r}") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value, e.g. train.steps=100")
        _set(tree, key.strip(), _yaml(value, f"override {item!r}"))
    return _build(RunConfig, tree, "")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


GRID = (2, 2)
"""The demo's process grid."""


def demo_config(folder: str, *, steps: int = 200, size: int = 256) -> RunConfig:
    """The demo's run (``haloseg demo``, ``haloseg bench train``): 3-class ellipses at
    ``size``², the small U-Net, each image over a 2x2 grid of processes."""
    return RunConfig(
        name="demo",
        output_dir=folder,
        device="cpu",
        data=DataConfig(kind="synthetic", shape=[size, size], num_images=48, num_classes=3),
        parallel=ParallelConfig(grid=list(GRID)),
        train=TrainConfig(steps=steps, batch_size=2, val_every=50, checkpoint_every=100),
    )


def timing_config(cfg: RunConfig, grid: list[int], **train: Any) -> RunConfig:
    """``cfg`` on another ``grid``, validating and checkpointing only at its end: a run
    measured for its cost (``train`` replaces training settings, e.g. ``steps``)."""
    return dataclasses.replace(
        cfg, parallel=ParallelConfig(grid=list(grid)),
        train=dataclasses.replace(cfg.train, val_every=10**6, checkpoint_every=10**6, **train),
    )  # fmt: skip
