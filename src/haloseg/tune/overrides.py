"""A trial's config as the ``key=value`` overrides ``load_config`` reads, and the dotted keys
a config has."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from haloseg.config import RunConfig

__all__ = ["config_keys", "trial_overrides"]


def config_keys() -> list[str]:
    """Every dotted key a config (and so a search) can set."""
    keys = []
    for f in dataclasses.fields(RunConfig):
        section = f.default_factory
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars (which Tune's draws may return) as Python ones."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def trial_overrides(base: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """``key=value`` overrides that rebuild the config ``base`` (a ``RunConfig.to_dict()``)
    with ``values`` (dotted keys) replacing its own: what ``load_config`` reads."""
    items = []
    for key, value in base.items():
        if isinstance(value, dict) and key != "regions":
            items += [f"{key}.{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            items.append(f"{key}={json.dumps(value)}")
    return items + [f"{k}={json.dumps(_plain(v))}" for k, v in values.items()]
