"""Live tensor bytes on any device, counted op by op: what the memory model is checked against.

A dispatch mode sees every tensor an operator returns. Each storage is counted once while any
tensor on it is alive (in-place ops and aliases such as ``detach`` return tensors on a storage
already counted) and uncounted when the last one is freed, so ``peak`` is the high-water mark
of the bytes PyTorch's tensors held: activations, saved tensors, gradients, optimizer state.
It does not see what kernels allocate outside tensors (oneDNN scratch on CPU); on CUDA,
``torch.cuda.max_memory_allocated`` sees that too.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak`` (bytes) and ``m.live`` (still held).

    ``device`` restricts the count to tensors on that device type ("cpu", "cuda"); host
    copies of swapped activations are then left out of a CUDA count.
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.live = self.peak = 0
        self._storages: dict[tuple[str, int], list[int]] = {}
        self._paused = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    @contextlib.contextmanager
    def ignoring(self) -> Iterator[None]:
        """Leave out what is allocated inside the block (e.g. host copies of swapped
        activations when host and device are both the CPU)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor, key: tuple[str, int]) -> None:
        if t.device.type == "meta" or (self.device and t.device.type != self.device):
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):  # noqa: ANN204
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        # An output on an input's storage (in-place op, view, alias) allocated nothing.
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = _key(t)
                if key in self._storages or key not in inputs:
                    self._track(t, key)
        return out


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()
