"""Activation swapping: tensors saved for backward wait in host memory instead of on the device.

``saved_tensors_hooks`` hands every tensor autograd saves to ``pack`` during forward and asks
``unpack`` for it during backward. ``pack`` copies a chosen tensor into (pinned, on CUDA) host
memory on a copy stream of its own and lets the device tensor go; ``unpack`` brings it back and,
because backward asks for saved tensors in roughly the reverse of the order forward saved them,
starts bringing back the next ``prefetch`` ones on the copy stream too, so that the copies
overlap the backward's compute. Without CUDA the same path runs host to host, which is what the
CPU tests check.

Which tensors are swapped (the policy, and the tensors never swapped: parameters, buffers,
tensors under ``SWAP_FLOOR``) is :mod:`haloseg.memory.swap_policy`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from haloseg.config import SWAP_POLICIES
from haloseg.errors import ConfigError
from haloseg.memory.swap_policy import SWAP_FLOOR, SwapChoice, check_options

__all__ = ["SWAP_FLOOR", "SWAP_POLICIES", "ActivationSwapper", "SwapStats", "swap_activations"]

log = logging.getLogger(__name__)

# How far back in pack order a prefetch looks for handles still on the host.
_SCAN_LIMIT = 64

_Key = tuple[Any, ...]


@dataclass
class SwapStats:
    """What the swapper did since its ``with`` block was last entered."""

    tensors_swapped: int = 0
    """Distinct tensors copied to host (a storage saved by several ops counts once)."""
    bytes_out: int = 0
    """Bytes copied from the device to host memory."""
    bytes_in: int = 0
    """Bytes copied back to the device (twice for a graph run backward twice)."""
    tensors_kept: int = 0
    """Saved activations left on the device (parameters and buffers not counted)."""


class _Handle:
    """One swapped tensor: its host copy, and its device copy while backward needs it."""

    __slots__ = (
        "__weakref__",
        "copy",
        "device",
        "host",
        "index",
        "nbytes",
        "owner",
        "pending",
        "ready",
        "uses",
    )

    def __init__(self, owner: ActivationSwapper, host: torch.Tensor, device: torch.device) -> None:
        self.owner = owner
        self.host = host
        self.device = device
        self.nbytes = host.untyped_storage().nbytes()
        self.copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.uses = self.pending = 1
        self.index = -1

    def __del__(self) -> None:
        # The graph let go of the last saved reference: the host copy goes with the handle.
        self.owner._host_bytes -= self.nbytes


class ActivationSwapper:
    """Swap the activations saved during forward to host memory; bring them back for backward.

    Use one ``with`` block around forward *and* backward of a step::

        swapper = ActivationSwapper(model, policy="skips")
        with swapper:
            loss = criterion(model(x), y)
            loss.backward()
        swapper.stats  # SwapStats of this step

    Policies (``SWAP_POLICIES``): ``"all"`` swaps every saved activation; ``"skips"`` only those
    saved while running ``skip_modules`` (for a haloseg ``UNet`` by default ``encoder.0`` to
    ``encoder.{depth-1}`` and ``pools.*``, whose activations live from the encoder's forward to
    its backward); ``"min_bytes"`` those of at least ``min_bytes``; ``"budget"`` keeps
    activations on the device until the saved ones held there reach ``budget`` bytes and swaps
    the rest; ``"none"`` does nothing. Every policy leaves parameters, buffers and tensors under
    64 KiB on the device. ``prefetch`` is how many swapped tensors backward brings back ahead of
    the one it asks for. Without ``model`` parameters are still recognised (autograd hands
    the ``nn.Parameter`` itself to the hook), but views of them are not.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        policy: str = "all",
        min_bytes: int = 1 << 20,
        budget: int | None = None,
        prefetch: int = 2,
        skip_modules: Sequence[str] | None = None,
    ) -> None:
        check_options(policy, min_bytes, budget, prefetch, skip_modules)
        self._choice = SwapChoice(model, policy, min_bytes, budget, skip_modules)
        self.model = model
        self.policy = policy
        self.min_bytes = min_bytes
        self.budget = budget
        self.prefetch = prefetch
        self.skip_modules = self._choice.skip_modules
        self.stats = SwapStats()
        self._host_bytes = 0
        self._cache: dict[_Key, tuple[weakref.ref, weakref.ref]] = {}
        self._order: list[weakref.ref[_Handle]] = []
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._hooks: Any = None

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held now by swapped tensors whose graph is still alive."""
        return self._host_bytes

    # -- the with block ------------------------------------------------------------------

    def __enter__(self) -> ActivationSwapper:
        if self._hooks is not None:
            raise ConfigError(
                "this ActivationSwapper is already active; leave its with block before "
                "entering it again, or use a second swapper"
            )
        self.stats = SwapStats()
        if self.policy == "none":
            self._hooks = False
            return self
        self._order = [r for r in self._order if r() is not None]
        for i, ref in enumerate(self._order):
            ref().index = i  # type: ignore[union-attr]
        self._choice.start()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hooks:
            self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None
        self._choice.stop()
        log.debug("activation swapping (%s): %s", self.policy, self.stats)

    # -- forward: pack -------------------------------------------------------------------

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._choice.eligible(t):
            return t
        key = _dedup_key(t)
        hit = self._cache.get(key)
        if hit is not None:
            storage_ref, handle_ref = hit
            handle = handle_ref()
            # The weak reference tells a live storage from a new one at a recycled address.
            if handle is not None and storage_ref() is t.untyped_storage():
                handle.uses += 1
                handle.pending += 1
                return handle
        if not self._choice.chosen(t):
            self.stats.tensors_kept += 1
            self._choice.keep(t)
            return t
        handle = self._swap_out(t)
        storage = t.untyped_storage()
        entry = (weakref.ref(storage, lambda ref: self._forget(key, ref)), weakref.ref(handle))
        self._cache[key] = entry
        return handle

    def _forget(self, key: _Key, ref: weakref.ref) -> None:
        entry = self._cache.get(key)
        if entry is not None and entry[0] is ref:
            del self._cache[key]

    def _swap_out(self, t: torch.Tensor) -> _Handle:
        cuda = t.device.type == "cuda"
        # empty_like keeps the strides of a dense tensor (channels-last stays channels-last).
        host = torch.empty_like(t, device="cpu", pin_memory=cuda)
        if cuda:
            compute = torch.cuda.current_stream(t.device)
            stream = self._copy_stream(t.device)
            # The copy must see the finished activation, and the allocator must not hand its
            # memory to another tensor before the copy has read it.
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)
        else:
            host.copy_(t)
        handle = _Handle(self, host, t.device)
        handle.index = len(self._order)
        self._order.append(weakref.ref(handle))
        self._host_bytes += handle.nbytes
        self.stats.tensors_swapped += 1
        self.stats.bytes_out += handle.nbytes
        return handle

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    # -- backward: unpack ----------------------------------------------------------------

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Handle):
            return packed
        try:
            return self._bring_back(packed)
        except BaseException:
            # Out of memory, say: the exception's frames may outlive this backward, so the
            # device copies must not hang on them (the host copies go with the graph).
            self._drop_device_copies()
            raise

    def _drop_device_copies(self) -> None:
        for ref in self._order:
            handle = ref()
            if handle is not None:
                handle.copy = handle.ready = None
                handle.pending = handle.uses

    def _bring_back(self, handle: _Handle) -> torch.Tensor:
        if handle.copy is None:
            self._fetch(handle)
        self._prefetch_before(handle.index)
        t = handle.copy
        assert t is not None  # _fetch set it
        if handle.ready is not None:
            compute = torch.cuda.current_stream(handle.device)
            compute.wait_event(handle.ready)
            # Allocated on the copy stream, used on this one: keep it until this use is done.
            t.record_stream(compute)
        handle.pending -= 1
        if handle.pending <= 0:
            # Last use in this backward; a retained graph asks again from the host copy.
            handle.copy = handle.ready = None
            handle.pending = handle.uses
        return t

    def _fetch(self, handle: _Handle) -> None:
        self.stats.bytes_in += handle.nbytes
        if handle.device.type != "cuda":
            handle.copy = handle.host.clone()
            return
        stream = self._copy_stream(handle.device)
        with torch.cuda.stream(stream):
            copy = torch.empty_like(handle.host, device=handle.device)
            copy.copy_(handle.host, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record(stream)
        handle.copy = copy

    def _prefetch_before(self, index: int) -> None:
        """Bring back the next ``prefetch`` handles in reverse pack order, if on host only."""
        found = 0
        for j in range(index - 1, max(index - 1 - _SCAN_LIMIT, -1), -1):
            if found >= self.prefetch:
                return
            handle = self._order[j]()
            if handle is None:
                continue
            found += 1
            if handle.copy is None:
                self._fetch(handle)


def swap_activations(model: nn.Module, **kwargs: Any) -> ActivationSwapper:
    """``ActivationSwapper(model, **kwargs)``: use it as ``with swap_activations(model): ...``."""
    return ActivationSwapper(model, **kwargs)


# -- helpers -----------------------------------------------------------------------------


def _dedup_key(t: torch.Tensor) -> _Key:
    return (
        str(t.device),
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t._version,
    )
