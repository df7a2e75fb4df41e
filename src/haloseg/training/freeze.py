"""Frozen BatchNorm (``train.freeze_norm``): normalise with the running statistics while the
affine weights go on training.

Each BatchNorm stays in eval mode whatever ``model.train()`` asks (the trainer, DDP and the
pipeline all call it), so its output is a fixed affine map per channel: a local layer, which
overlapping tiles reproduce exactly, and one whose running statistics no step changes.
"""

from __future__ import annotations

import types

from torch import nn

from haloseg.errors import ConfigError

__all__ = ["batch_norms", "freeze_batch_norm"]


def batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` with their paths."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # fmt: skip


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batch_norm(model: nn.Module) -> list[str]:
    """Keep every BatchNorm of ``model`` in eval mode from now on; their paths.

    Raises ``ConfigError`` when the network has no BatchNorm, or one keeps no running
    statistics (it would normalise with the batch's in eval mode too).
    """
    found = batch_norms(model)
    if not found:
        raise ConfigError(
            f"train.freeze_norm=true freezes BatchNorm, but the {type(model).__name__} has no "
            "BatchNorm layer; drop train.freeze_norm"
        )
    for name, m in found:
        if m.running_mean is None:
            raise ConfigError(
                f"train.freeze_norm=true but BatchNorm '{name}' keeps no running statistics "
                "(track_running_stats=False), so it has none to freeze; build it with "
                "track_running_stats=True or drop train.freeze_norm"
            )
        m.train(False)
        # An instance attribute wins over nn.Module.train when a parent's train() reaches it.
        m.train = types.MethodType(_stay_in_eval, m)
    return [name for name, _ in found]
