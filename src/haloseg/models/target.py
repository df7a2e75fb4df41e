"""Networks of other libraries, named by a dotted path (``model.target``).

``resolve_target`` imports the class, ``check_arguments`` holds the configured keyword
arguments against its constructor's signature, ``data_arguments`` fills in the arguments the
data decides (image dims, channels, classes) and ``build_target`` calls the constructor.
Every refusal is a one-line ``ConfigError`` naming the value, what was expected and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from haloseg.errors import ConfigError

__all__ = ["DATA_ARGUMENTS", "build_target", "check_arguments", "data_arguments", "resolve_target"]

DATA_ARGUMENTS: dict[str, str] = {
    "spatial_dims": "spatial_dims",
    "in_channels": "in_channels",
    "out_channels": "num_classes",
    "classes": "num_classes",
}
"""Constructor parameters the data decides (MONAI's names and segmentation_models_pytorch's
``classes``) -> the fact of the data each one takes."""

_FACTS = {
    "spatial_dims": "the images are {}-D",
    "in_channels": "the images have {} channel(s)",
    "num_classes": "the data has {} classes",
}

# How to install the packages whose pip name differs from the module's, or that an extra of
# haloseg brings with the versions it is tested with.
_INSTALL = {
    "segmentation_models_pytorch": "pip install 'haloseg[smp]'",
    "timm": "pip install 'haloseg[smp]'",
    "monai": "pip install 'haloseg[monai]'",
}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no message"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _install(module: str) -> str:
    top = module.split(".")[0]
    return _INSTALL.get(top, f"pip install {top}")


def _near(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_longest(parts: list[str], target: str) -> tuple[ModuleType, list[str]]:
    """The longest importable module that ``parts`` start with, and the names after it."""
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        try:
            return importlib.import_module(name), parts[i:]
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if name == missing or name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            hint = _install(parts[0] if parts[0] in _INSTALL else missing)
            raise ConfigError(
                f"model.target={target}: importing {name} needs the module {missing!r}, which "
                f"is not installed; install it ({hint})"
            ) from None
        except Exception as e:  # noqa: BLE001 - any failure of a third-party import
            raise ConfigError(
                f"model.target={target}: importing {name} failed ({_one_line(e)}); check that "
                f"package's installation ({_install(name)})"
            ) from None
    raise ConfigError(
        f"model.target={target}: no module named {parts[0]!r} is installed; install it "
        f"({_install(parts[0])}) or correct the dotted path"
    )


def resolve_target(target: str) -> type[nn.Module]:
    """The ``nn.Module`` class that the dotted path ``target`` names, e.g.
    ``monai.networks.nets.SegResNet``."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(
            f"model.target={target!r} is not a dotted path module.Class; give one such as "
            "monai.networks.nets.SegResNet"
        )
    obj: Any
    obj, rest = _import_longest(parts, target)
    owner = ".".join(parts[: len(parts) - len(rest)])
    for name in rest:
        if not hasattr(obj, name):
            public = [n for n in dir(obj) if not n.startswith("_")]
            near = _near(name, public)
            raise ConfigError(f"model.target={target}: {owner} has no {name!r}{near}")
        obj, owner = getattr(obj, name), f"{owner}.{name}"
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        what = "a class" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ConfigError(
            f"model.target={target} is {what}, not a torch.nn.Module subclass; give a network "
            "class such as monai.networks.nets.SegResNet"
        )
    return obj


def _parameters(cls: type) -> tuple[list[str], bool]:
    """The keyword parameters of ``cls``'s constructor, and whether it takes ``**kwargs``
    (so any name); a constructor without a readable signature takes anything."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_arguments(cls: type, kwargs: Mapping[str, Any], target: str) -> None:
    """Refuse a key of ``kwargs`` that ``cls``'s constructor does not take."""
    names, anything = _parameters(cls)
    if anything:
        return
    for key in kwargs:
        if key not in names:
            raise ConfigError(
                f"model.kwargs.{key}: {target} takes no argument {key!r}{_near(str(key), names)}; "
                f"it takes {', '.join(names) or 'no arguments'}"
            )


def data_arguments(
    cls: type, kwargs: Mapping[str, Any], target: str, **facts: int | None
) -> dict[str, Any]:
    """``kwargs`` with the data's ``facts`` (``spatial_dims``, ``in_channels``,
    ``num_classes``; None where not known yet) filled in for the constructor parameters of
    ``DATA_ARGUMENTS`` that ``kwargs`` leaves out; a given one that disagrees is refused."""
    names, _ = _parameters(cls)
    filled = dict(kwargs)
    for param, fact in DATA_ARGUMENTS.items():
        value = facts.get(fact)
        if value is None or param not in names:
            continue
        if param not in filled:
            filled[param] = value
        elif filled[param] != value or isinstance(filled[param], bool):
            raise ConfigError(
                f"model.kwargs.{param}={filled[param]!r} but {_FACTS[fact].format(value)}; drop "
                f"model.kwargs.{param} (haloseg fills it from the data) or set it to {value}"
            )
    return filled


def build_target(target: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``target(**kwargs)``; a constructor's exception becomes a one-line ``ConfigError``."""
    cls = resolve_target(target)
    check_arguments(cls, kwargs, target)
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - any refusal of a third-party constructor
        raise ConfigError(
            f"model.target={target} could not be built from model.kwargs ({_one_line(e)}); "
            "fix model.kwargs"
        ) from None
