"""The search file (``haloseg tune CONFIG --search SEARCH.yaml``): which config keys vary
and how, what is optimised, the early-stopping rule and the resources of one trial.

Parsing needs no Ray: every key is checked against ``RunConfig`` (with "did you mean"), and
every value a trial can draw (grid and choice values, range ends) is checked by building the
trial's config from it, so a bad search fails here and not in the middle of the experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from haloseg.config import RunConfig, load_config
from haloseg.errors import ConfigError
from haloseg.tune.overrides import config_keys, trial_overrides
from haloseg.tune.search_spec import KINDS, Asha, Param, Resources, SearchSpec

# The search's dataclasses live in haloseg.tune.search_spec, config_keys and trial_overrides
# in haloseg.tune.overrides; importers find them here.
__all__ = [
    "KINDS",
    "Asha",
    "Param",
    "Resources",
    "SearchSpec",
    "config_keys",
    "load_search",
    "parse_search",
    "trial_overrides",
]

_FIXED = ("name", "output_dir", "parallel.grid", "parallel.data")
"""Keys a search cannot vary: the experiment names trial folders, and every trial of one
experiment runs on the same number of processes."""

_TOP = {f.name for f in dataclasses.fields(SearchSpec)} - {"params"} | {"space"}


def _closest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(choices)}"


# PyYAML reads 1e-3 (no dot) as a string, as YAML 1.1 says; a search means the number.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value) else value


def _param(key: str, rule: Any, where: str) -> Param:
    if not isinstance(rule, dict):
        return Param(key, "grid", (_number(rule),))
    if len(rule) != 1 or next(iter(rule)) not in KINDS:
        raise ConfigError(
            f"{where}: space.{key}={rule!r} must be a value or one of "
            + ", ".join(f"{{{k}: [...]}}" for k in KINDS)
        )
    ((kind, values),) = rule.items()
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: space.{key}.{kind}={values!r} must be a non-empty list")
    values = [_number(v) for v in values]
    if kind in ("uniform", "loguniform"):
        ends = values
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ends)
        if len(ends) != 2 or not numeric or not ends[0] < ends[1]:
            raise ConfigError(
                f"{where}: space.{key}.{kind}={values!r} must be two numbers [low, high] "
                "with low < high"
            )
        if kind == "loguniform" and ends[0] <= 0:
            raise ConfigError(
                f"{where}: space.{key}.loguniform={values!r} needs low > 0 (use uniform)"
            )
        values = [float(v) for v in ends]
    return Param(key, kind, tuple(values))


def _check_values(param: Param, base: dict[str, Any], where: str) -> None:
    """Build the config each value of ``param`` (each end of a range) gives."""
    for value in param.values:
        try:
            load_config(None, trial_overrides(base, {param.key: value}))
        except ConfigError as e:
            raise ConfigError(f"{where}: space.{param.key}={value!r}: {e}") from None


def _metric(spec: dict[str, Any], base: RunConfig, where: str) -> tuple[str, str]:
    metric = spec.get("metric", "dice_mean")
    if not isinstance(metric, str) or not (metric in ("loss", "val_loss")
                                           or metric.startswith("dice_")):  # fmt: skip
        raise ConfigError(
            f"{where}: metric={metric!r} is not a reported metric; use dice_mean, "
            "dice_classN, dice_REGION, val_loss or loss"
        )
    if metric != "loss" and base.data.val_fraction == 0:
        raise ConfigError(
            f"{where}: metric={metric!r} needs validation images but data.val_fraction=0; "
            "set data.val_fraction or use metric: loss"
        )
    mode = spec.get("mode", "max" if metric.startswith("dice_") else "min")
    if mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode={mode!r} is not one of max, min")
    return metric, mode


def _metric_exists(metric: str, base: RunConfig, searched: set[str], where: str) -> None:
    """A per-class or per-region Dice the trials will report, where the config says which."""
    if not metric.startswith("dice_") or metric == "dice_mean":
        return
    name = metric[len("dice_") :]
    regions = base.data.regions
    if name in regions or "data.regions" in searched:
        return
    match = re.fullmatch(r"class([1-9][0-9]*)", name)  # as the trials name them
    classes = base.data.num_classes
    if match and (classes is None or "data.num_classes" in searched):
        return  # the dataset says how many classes there are
    if match and int(match.group(1)) < classes:
        return
    number = match is not None
    known = ["dice_mean"] + [f"dice_class{c}" for c in range(1, classes or 0)]
    known += [f"dice_{r}" for r in regions]
    raise ConfigError(
        f"{where}: metric={metric!r} is not reported by these trials"
        + (f" (data.num_classes={classes})" if number else "")
        + f"; use one of {', '.join(known)}"
        + ("" if number or regions else ", or name a region under data.regions")
    )


def _section(spec: dict[str, Any], name: str, cls: type, where: str) -> Any:
    values = spec.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {name} must be a mapping, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {name}.{key!r}{_closest(str(key), known)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None


def _whole(name: str, value: Any, where: str, *, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{where}: {name}={value!r} must be a whole number >= {least}")


def parse_search(spec: Any, base: RunConfig, where: str = "search") -> SearchSpec:
    """A ``SearchSpec`` from the mapping of a search file, checked against ``base``."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must hold a mapping with a 'space' section, got {spec!r}")
    for key in spec:
        if key not in _TOP:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(str(key), sorted(_TOP))}")
    space = spec.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"{where}: the search space is empty; list config keys under 'space:', "
            "e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}"
        )
    keys, tree = config_keys(), base.to_dict()
    params = []
    for key, rule in space.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown search key {key!r}{_closest(str(key), keys)}")
        if key in _FIXED:
            raise ConfigError(
                f"{where}: {key!r} cannot be searched (every trial runs in a folder of the "
                "experiment, on the same number of processes); set it in the config"
            )
        params.append(_param(key, rule, where))
        _check_values(params[-1], tree, where)
    metric, mode = _metric(spec, base, where)
    _metric_exists(metric, base, {p.key for p in params}, where)
    asha = _section(spec, "asha", Asha, where)
    resources = _section(spec, "resources", Resources, where)
    _positive_resources(resources, where)
    for name, least in (("samples", 1), ("seed", 0), ("max_failures", -1)):
        _whole(name, spec.get(name, 0 if name == "seed" else 1), where, least=least)
    if spec.get("max_concurrent") is not None:
        _whole("max_concurrent", spec["max_concurrent"], where, least=1)
    if asha.grace_period is not None:
        _whole("asha.grace_period", asha.grace_period, where, least=1)
    _whole("asha.reduction_factor", asha.reduction_factor, where, least=2)
    scheduler = spec.get("scheduler", "asha")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"{where}: scheduler={scheduler!r} is not one of asha, fifo")
    return SearchSpec(
        params=tuple(params), metric=metric, mode=mode, samples=spec.get("samples", 1),
        seed=spec.get("seed", 0), scheduler=scheduler, asha=asha, resources=resources,
        max_failures=spec.get("max_failures", 1), max_concurrent=spec.get("max_concurrent"),
    )  # fmt: skip


def _positive_resources(resources: Resources, where: str) -> None:
    for name in ("cpus", "gpus"):
        value = getattr(resources, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}: resources.{name}={value!r} must be a number >= 0")
    if resources.cpus == 0 and resources.gpus == 0:
        raise ConfigError(f"{where}: resources.cpus and resources.gpus are both 0; give a trial "
                          "at least one CPU or GPU")  # fmt: skip


def load_search(path: str | os.PathLike, base: RunConfig) -> SearchSpec:
    """The search file at ``path``, checked against the base config ``base``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search file {str(p)!r} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"search file {str(p)!r} is not valid YAML: {problem}") from None
    return parse_search(spec, base, f"search file {str(p)!r}")
