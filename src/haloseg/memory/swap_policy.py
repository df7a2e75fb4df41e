"""Which saved tensors an ``ActivationSwapper`` moves to host memory: its policy and options,
checked, and the tensors it never moves (parameters, buffers and views of them, tensors under
``SWAP_FLOOR``, tensor subclasses, sparse tensors, devices other than CPU and CUDA)."""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from haloseg.config import SWAP_POLICIES
from haloseg.errors import ConfigError
from haloseg.models.unet import UNet

__all__ = ["SWAP_FLOOR", "SwapChoice", "check_options"]


# Below 64 KiB a device-host copy is dominated by its launch and event (~10 us), and the bytes
# it frees are noise next to one U-Net activation.
SWAP_FLOOR = 64 << 10


class SwapChoice:
    """The policy of one swapper: what may be swapped (``eligible``), what the policy swaps
    (``chosen``) and what stays on the device (``keep``, counted against ``budget``). The
    options are those ``check_options`` accepted.

    ``start`` and ``stop`` bracket the swapper's ``with`` block: the model's parameters and
    buffers are noted, and under ``"skips"`` hooks on ``skip_modules`` say when a forward
    runs inside them.
    """

    def __init__(
        self,
        model: nn.Module | None,
        policy: str,
        min_bytes: int,
        budget: int | None,
        skip_modules: Sequence[str] | None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.min_bytes = min_bytes
        self.budget = budget
        self.skip_modules = _skip_names(model, policy, skip_modules)
        self._in_skip = 0
        self._protected: set[tuple[str, int]] = set()
        self._kept: dict[tuple[str, int], int] = {}
        self._kept_bytes = 0
        self._module_hooks: list[Any] = []

    def start(self) -> None:
        """The swapper's ``with`` block begins."""
        self._protected = _storages_of(self.model)
        self._add_module_hooks()

    def stop(self) -> None:
        """The swapper's ``with`` block ends."""
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = []
        self._in_skip = 0

    def eligible(self, t: torch.Tensor) -> bool:
        """Could ``t`` be swapped at all (never parameters, buffers or tiny tensors)?"""
        if type(t) is not torch.Tensor or t.layout != torch.strided:
            return False
        if t.device.type not in ("cpu", "cuda"):
            return False
        if _storage_key(t) in self._protected:
            return False
        return t.numel() * t.element_size() >= SWAP_FLOOR

    def chosen(self, t: torch.Tensor) -> bool:
        """Does the policy swap this eligible tensor?"""
        nbytes = t.numel() * t.element_size()
        if self.policy == "skips":
            return self._in_skip > 0
        if self.policy == "min_bytes":
            return nbytes >= self.min_bytes
        if self.policy == "budget":
            # A storage already held on the device frees nothing when swapped.
            held = _storage_key(t) in self._kept
            return not held and self._kept_bytes + t.untyped_storage().nbytes() > self.budget
        return True

    def keep(self, t: torch.Tensor) -> None:
        """``t`` stays on the device: under ``budget`` its storage counts until it is freed."""
        key = _storage_key(t)
        if self.policy != "budget" or key in self._kept:
            return
        nbytes = t.untyped_storage().nbytes()
        self._kept[key] = nbytes
        self._kept_bytes += nbytes
        weakref.finalize(t.untyped_storage(), self._release_kept, key)

    def _release_kept(self, key: tuple[str, int]) -> None:
        self._kept_bytes -= self._kept.pop(key, 0)

    def _add_module_hooks(self) -> None:
        if self.policy != "skips" or self.model is None:
            return
        modules = dict(self.model.named_modules())
        for name in self.skip_modules:
            module = modules[name]
            self._module_hooks.append(module.register_forward_pre_hook(self._enter_skip))
            self._module_hooks.append(
                module.register_forward_hook(self._leave_skip, always_call=True)
            )

    def _enter_skip(self, module: nn.Module, args: Any) -> None:
        self._in_skip += 1

    def _leave_skip(self, module: nn.Module, args: Any, output: Any) -> None:
        self._in_skip -= 1


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _storages_of(model: nn.Module | None) -> set[tuple[str, int]]:
    if model is None:
        return set()
    tensors = [*model.parameters(), *model.buffers()]
    return {_storage_key(t) for t in tensors if t.untyped_storage().nbytes()}


def check_options(
    policy: str,
    min_bytes: int,
    budget: int | None,
    prefetch: int,
    skip_modules: Sequence[str] | None,
) -> None:
    """Refuse options of ``ActivationSwapper`` that do not go together, saying the fix."""
    if policy not in SWAP_POLICIES:
        raise ConfigError(
            f"swap policy {policy!r} is unknown; pick one of {', '.join(SWAP_POLICIES)}"
        )
    for name, value in (("min_bytes", min_bytes), ("prefetch", prefetch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r} must be an integer >= 0; pass e.g. 2")
    if policy == "budget" and budget is None:
        raise ConfigError(
            "swap policy 'budget' needs budget= (device bytes for saved activations); "
            "pass e.g. budget=8 * 2**30"
        )
    if budget is not None and (policy != "budget" or isinstance(budget, bool) or budget < 0):
        raise ConfigError(
            f"budget={budget!r} applies to policy='budget' only and must be >= 0; "
            f"drop it or set policy='budget' (policy is {policy!r})"
        )
    if skip_modules is not None and policy != "skips":
        raise ConfigError(
            f"skip_modules applies to policy='skips' only (policy is {policy!r}); "
            "drop skip_modules or set policy='skips'"
        )


def _skip_names(
    model: nn.Module | None, policy: str, skip_modules: Sequence[str] | None
) -> tuple[str, ...]:
    if policy != "skips":
        return ()
    if model is None:
        raise ConfigError(
            "swap policy 'skips' needs the model to find the modules feeding the skips; "
            "pass ActivationSwapper(model, policy='skips')"
        )
    if skip_modules is None:
        if not isinstance(model, UNet):
            raise ConfigError(
                f"swap policy 'skips' knows the skip modules of a haloseg UNet only, not of "
                f"{type(model).__name__}; pass skip_modules=[names of the modules feeding skips]"
            )
        depth = model.depth
        return (*(f"encoder.{i}" for i in range(depth)), *(f"pools.{i}" for i in range(depth)))
    names = dict(model.named_modules())
    for name in skip_modules:
        if name not in names or name == "":
            close = difflib.get_close_matches(name, [n for n in names if n], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see model.named_modules()"
            raise ConfigError(
                f"skip_modules names {name!r}, which {type(model).__name__} does not have; {hint}"
            )
    return tuple(skip_modules)
