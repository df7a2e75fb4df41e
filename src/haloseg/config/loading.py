"""Configs from YAML files and ``key=value`` overrides, and back to YAML next to a run.

Unknown keys are refused with the closest known one, values are checked against the fields'
types, and each section's ``__post_init__`` validates what the types cannot say.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from haloseg.config.model import ModelConfig
from haloseg.config.run import RunConfig
from haloseg.config.sections import DataConfig, MemoryConfig, ParallelConfig, TrainConfig
from haloseg.errors import ConfigError

__all__ = ["load_config", "save_config"]


def _closest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(choices)}"


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
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
