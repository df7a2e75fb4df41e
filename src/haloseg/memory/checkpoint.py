"""Activation checkpointing per U-Net level that recomputes without side effects.

A checkpointed block keeps only its inputs during forward and runs again in backward
(``torch.utils.checkpoint``, non-reentrant). Run naively, the recomputation would exchange
every halo and gather every normalisation statistic a second time and advance BatchNorm's
running statistics twice. Here the first forward records what the region received on a
``Tape``; the recomputation replays it (no message is sent, the same statistics are used),
finds the same exchange plans in the layers' caches, and BatchNorm's buffers are put back
as they were once it is done.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from haloseg.errors import ConfigError
from haloseg.parallel.layers import Partitioned
from haloseg.parallel.tape import Tape, taping

__all__ = ["Checkpointed", "checkpoint_levels", "unet_levels"]


def unet_levels(model: nn.Module) -> list[str]:
    """The blocks of a haloseg ``UNet``, one region each: ``encoder.i`` and ``decoder.i``."""
    from haloseg.models import UNet

    if not isinstance(model, UNet):
        raise ConfigError(
            f"checkpointing per U-Net level needs a haloseg UNet, not {type(model).__name__}; "
            "name the modules to checkpoint instead (modules=[...])"
        )
    return [f"encoder.{i}" for i in range(len(model.encoder))] + [
        f"decoder.{i}" for i in range(len(model.decoder))
    ]


def checkpoint_levels(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Checkpoint ``modules`` of ``model`` (default: every U-Net level), in place.

    Works before or after ``spatial_parallel``; parameters and ``state_dict`` keys are
    unchanged. Returns the names of the checkpointed modules.
    """
    names = list(modules) if modules is not None else unet_levels(model)
    known = dict(model.named_modules())
    _refuse_nesting(names)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"module {name!r} is not in {type(model).__name__}{hint}")
        module = known[name]
        if not isinstance(module, Checkpointed):
            base = type(module)
            module.__class__ = type(base.__name__, (Checkpointed, base), {})
    return names


def _refuse_nesting(names: list[str]) -> None:
    """A region inside another would record afresh (and exchange again) when the outer one
    is recomputed; the outer region already keeps only its input."""
    for a in names:
        for b in names:
            if a != b and (b.startswith(a + ".") or a == ""):
                raise ConfigError(
                    f"module {b!r} lies inside {a or '<root>'!r}, also to be checkpointed; "
                    "checkpoint one of the two"
                )


class Checkpointed:
    """Mixin of a checkpointed module: forward under ``torch.utils.checkpoint``."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run = super().forward  # type: ignore[misc]
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        return checkpoint(
            run, *args, use_reentrant=False, context_fn=lambda: _contexts(self), **kwargs
        )


def _contexts(module: nn.Module) -> tuple[Any, Any]:
    tape, layers = Tape(), _LayerClocks(module)
    record = _Record(tape, layers, module)
    return record, _Replay(tape, layers, module, record)


class _LayerClocks:
    """Where the partitioned layers of a region stand in a forward (which call this is),
    so that a recomputation finds the exchange plans the first forward cached."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m._hs for m in module.modules() if isinstance(m, Partitioned)]
        self.decs = list({id(c.dec): c.dec for c in self.layers}.values())
        self.saved: tuple[list[Any], dict[int, Any]] = ([], {})

    def _sites(self) -> list[Any]:
        calls = [s for d in self.decs for s in getattr(d, "_hs_call_sites", {}).values()]
        return self.layers + calls

    def read(self) -> tuple[list[Any], dict[int, Any]]:
        return (
            [(d.forward_id, d.forward_key) for d in self.decs],
            {id(c): (c.forward_id, c.calls) for c in self._sites()},
        )

    def write(self, state: tuple[list[Any], dict[int, Any]]) -> None:
        for d, (fid, key) in zip(self.decs, state[0], strict=True):
            d.forward_id, d.forward_key = fid, key
        for c in self._sites():
            # A functional call site first seen inside the region starts it afresh.
            c.forward_id, c.calls = state[1].get(id(c), (-1, 0))


class _Record:
    """The first forward's context: record the tape, note the layers' clocks and mode."""

    def __init__(self, tape: Tape, layers: _LayerClocks, module: nn.Module) -> None:
        self.tape, self.layers, self.module = tape, layers, module
        self.training = module.training
        self._taping: Any = None

    def __enter__(self) -> None:
        self.layers.saved = self.layers.read()
        self.training = self.module.training
        self._taping = taping(self.tape, replay=False)
        self._taping.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._taping.__exit__(*exc)


class _Replay:
    """Each recomputation's context (reusable: a retained graph recomputes again): replay
    the tape from its start with the first forward's clocks, then put BatchNorm's buffers
    and the clocks back."""

    def __init__(
        self, tape: Tape, layers: _LayerClocks, module: nn.Module, record: _Record
    ) -> None:
        self.tape, self.layers, self.module, self.record = tape, layers, module, record
        self._undo: list[Any] = []

    def __enter__(self) -> None:
        clocks = self.layers
        if self.module.training != self.record.training:
            raise ConfigError(
                f"{type(self.module).__name__} was switched to "
                f"{'train' if self.module.training else 'eval'} mode between its forward and "
                "backward; a checkpointed level recomputes in the mode of its forward, so call "
                "backward before changing modes"
            )
        norms = [
            m for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]  # fmt: skip
        buffers = [(m, [b.clone() for b in _stat_buffers(m)]) for m in norms]
        now = clocks.read()
        clocks.write(clocks.saved)
        taping_ = taping(self.tape, replay=True)
        taping_.__enter__()
        self._undo.append((buffers, now, taping_))

    def __exit__(self, *exc: object) -> None:
        # Also after an early stop (the recomputation ends once it has what backward needs).
        buffers, now, taping_ = self._undo.pop()
        taping_.__exit__(*exc)
        self.layers.write(now)
        with torch.no_grad():
            for m, saved in buffers:
                for b, s in zip(_stat_buffers(m), saved, strict=True):
                    b.copy_(s)


def _stat_buffers(m: nn.Module) -> list[torch.Tensor]:
    return [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
