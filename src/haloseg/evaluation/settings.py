"""What an evaluation scores: :class:`EvaluationSettings`, given by hand or read from the
``model.json`` and ``config.yaml`` of a haloseg run folder."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import ConfigError

__all__ = ["EvaluationSettings", "load_run_settings"]


@dataclass(kw_only=True)
class EvaluationSettings:
    """What to score: the classes, named regions and the label value to leave out."""

    num_classes: int | None = None
    """Classes including background; unset: 1 + the largest label value over all labels."""
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Named unions of labels scored like classes, e.g. {"WT": [1, 2, 3]}."""
    ignore_label: int | None = None
    """Label value left out of every metric (made background in prediction and label)."""
    label_names: list[str] | None = None
    """Names of the classes, background first (or of classes 1..N-1 only), for the table."""

    def __post_init__(self) -> None:
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 2):
            raise ConfigError(f"num_classes={self.num_classes!r} must be an integer >= 2")
        if self.ignore_label is not None and not _is_int(self.ignore_label):
            raise ConfigError(f"ignore_label={self.ignore_label!r} must be an integer")
        if not isinstance(self.regions, Mapping):
            raise ConfigError(f"regions={self.regions!r} must map names to lists of labels")
        for name, labels in self.regions.items():
            _check_region(name, labels)
        names = self.label_names
        if names is not None and (
            not isinstance(names, list) or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigError(f"label_names={names!r} must be a list of strings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_region(name: str, labels: Any) -> None:
    if not isinstance(name, str) or name == "mean" or re.fullmatch(r"class\d+", name):
        raise ConfigError(
            f"region name {name!r} is taken; name regions other than 'mean' or 'classN' "
            "(those are the per-class columns)"
        )
    if not isinstance(labels, list | tuple) or not labels or not all(map(_is_int, labels)):
        raise ConfigError(
            f"region {name!r}={labels!r} must be a non-empty list of labels, e.g. WT=1,2,3"
        )


def load_run_settings(run_folder: str | os.PathLike) -> EvaluationSettings:
    """The classes, label names, regions and ignore label of a haloseg run folder: from its
    ``model.json`` where that has them, else from ``config.yaml`` (``data.*``)."""
    folder = Path(run_folder)
    config, model = folder / "config.yaml", folder / "model.json"
    if not config.is_file() and not model.is_file():
        raise ConfigError(
            f"run folder {folder} has neither config.yaml nor model.json; give "
            "the output_dir of a haloseg train run"
        )
    found: dict[str, Any] = {}
    if config.is_file():
        data = _read_mapping(config, "yaml").get("data") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{config}: data must be a mapping, not {data!r}; fix the file")
        found = {k: data.get(k) for k in ("num_classes", "regions", "ignore_label")}
    if model.is_file():
        tree = _read_mapping(model, "json")
        found.update(
            {
                k: tree[k]
                for k in ("num_classes", "label_names", "regions", "ignore_label")
                if k in tree
            }
        )
    found["regions"] = dict(found.get("regions") or {})
    try:
        return EvaluationSettings(**found)
    except ConfigError as e:
        raise ConfigError(f"run folder {folder}: {e}") from None


def _read_mapping(path: Path, kind: str) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
        tree = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"cannot read {path} as {kind.upper()} ({reason}); fix the file"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping, not {type(tree).__name__}; fix the file")
    return tree
