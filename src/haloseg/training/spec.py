"""What a run folder says about its model, so that inference and evaluation need nothing else.

``RunSpec`` records how to build the network, the intensity normalisation training applied,
the input channels and their names, the classes, label names, regions and ignore label, and
the voxel spacing and orientation of the training images. It travels inside every
checkpoint (``state["spec"]``) and beside them as ``model.json``, readable without torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haloseg.config import RunConfig
from haloseg.config.model import PRESET_OPTIONS
from haloseg.data.base import Dataset
from haloseg.errors import DataError

__all__ = ["RunSpec", "describe_run", "spec_from_state", "write_spec"]

log = logging.getLogger(__name__)
SPEC_FILE = "model.json"


@dataclass(kw_only=True)
class RunSpec:
    """Everything inference needs to rebuild a trained model and its preprocessing."""

    haloseg_version: str
    """The haloseg release that trained the model."""
    model: dict[str, Any]
    """How to build the network (``haloseg.models.build_network``): spatial_dims,
    in_channels, out_channels, and either a U-Net ``preset`` with its overrides or a class's
    dotted path ``target`` with the complete ``kwargs`` of its constructor."""
    normalize: str = "zscore"
    """Intensity normalisation per image and channel (``data.normalize``)."""
    channel_names: list[str] = field(default_factory=list)
    """Input channels in the order the network takes them."""
    num_classes: int = 2
    """Output classes including background."""
    label_names: list[str] = field(default_factory=list)
    """Name of each class id."""
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Named unions of labels scored as extra metrics."""
    ignore_label: int | None = None
    """Label value training left out of loss and metrics."""
    spacing: list[float] | None = None
    """Median voxel spacing of the training images (file units, mm for NIfTI)."""
    orientation: str | None = None
    """Axis codes shared by the training images (e.g. ``RAS``), if they all agree."""
    dtype: str = "float32"
    """Parameter dtype of training."""

    @property
    def spatial_dims(self) -> int:
        return int(self.model["spatial_dims"])

    @property
    def in_channels(self) -> int:
        return int(self.model["in_channels"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _names(dataset: Dataset, attribute: str, count: int, prefix: str) -> list[str]:
    names = getattr(dataset, attribute, None)
    if names is not None and len(names) == count:
        return [str(n) for n in names]
    return [f"{prefix}{i}" for i in range(count)]


def _geometry(dataset: Dataset) -> tuple[list[float] | None, str | None]:
    """Median spacing and the common orientation of ``dataset``'s samples (where known)."""
    infos = [dataset.info(i) for i in range(len(dataset))]
    spacings = [i.spacing for i in infos if i.spacing is not None]
    spacing = None
    if spacings and len(spacings) == len(infos):
        spacing = [float(statistics.median(s)) for s in zip(*spacings, strict=True)]
    orientations = {i.orientation for i in infos}
    orientation = orientations.pop() if len(orientations) == 1 else None
    return spacing, orientation


def describe_run(cfg: RunConfig, dataset: Dataset) -> RunSpec:
    """The spec of a run of ``cfg`` trained on ``dataset``."""
    from haloseg import __version__

    spacing, orientation = _geometry(dataset)
    return RunSpec(
        haloseg_version=__version__,
        model=cfg.model.network(dataset.spatial_dims, dataset.in_channels, dataset.num_classes),
        normalize=cfg.data.normalize,
        channel_names=_names(dataset, "channel_names", dataset.in_channels, "channel"),
        num_classes=dataset.num_classes,
        label_names=_names(dataset, "label_names", dataset.num_classes, "class"),
        regions={k: list(v) for k, v in cfg.data.regions.items()},
        ignore_label=cfg.data.ignore_label,
        spacing=spacing,
        orientation=orientation,
        dtype=cfg.train.dtype,
    )


def write_spec(spec: RunSpec, folder: str | os.PathLike) -> Path:
    """``folder/model.json``, written atomically."""
    path = Path(folder) / SPEC_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec.to_dict(), f, indent=2)
    os.replace(tmp, path)
    return path


def spec_from_state(state: dict[str, Any], where: str) -> RunSpec:
    """The spec of a checkpoint ``state``; checkpoints older than specs are described from
    their config and weights (normalisation, classes and regions were in the config)."""
    if "spec" in state:
        return RunSpec.from_dict(state["spec"])
    args = state.get("model_args") or _args_from_weights(state["model"], where)
    cfg = state.get("config", {})
    # Checkpoints older than specs know haloseg's U-Net presets only.
    model = {k: v for k, v in cfg.get("model", {}).items()
             if v is not None and k in ("preset", *PRESET_OPTIONS)}  # fmt: skip
    data = cfg.get("data", {})
    log.warning("%s has no run spec (an older haloseg): rebuilt from its config", where)
    return RunSpec(
        haloseg_version="unknown",
        model={"preset": "small", **model, **args},
        normalize=data.get("normalize", "zscore"),
        num_classes=int(args["out_channels"]),
        regions=dict(data.get("regions", {})),
        ignore_label=data.get("ignore_label"),
        dtype=cfg.get("train", {}).get("dtype", "float32"),
    )


def _args_from_weights(weights: dict[str, Any], where: str) -> dict[str, int]:
    convs = [v for k, v in weights.items() if k.endswith("weight") and v.dim() > 2]
    if not convs:
        raise DataError(f"{where} holds no convolution weights; give a haloseg checkpoint")
    return {"spatial_dims": convs[0].dim() - 2, "in_channels": convs[0].shape[1],
            "out_channels": convs[-1].shape[0]}  # fmt: skip
