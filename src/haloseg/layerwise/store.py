"""Where every node's whole output lives between layers: host memory or zarr arrays on disk.

A store holds one array per node, ``(N, C, *spatial)``; the executor writes each block once
and reads windows of it back. ``MemoryStore`` keeps CPU tensors (reads are views, copied to
the compute device by the caller); ``ZarrStore`` keeps chunked arrays on disk, chunked by
the node's block, for images whose activations do not fit host memory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from haloseg.errors import DataError
from haloseg.geometry import Box

__all__ = ["MemoryStore", "Store", "ZarrStore", "open_store"]


def _index(box: Box) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(a, b) for a, b in box))


class Store:
    """One whole array per node name."""

    def create(self, name: str, shape: Sequence[int], dtype: torch.dtype,
               chunks: Sequence[int]) -> None:  # fmt: skip
        raise NotImplementedError

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Hold ``tensor`` (on the CPU) as the whole array ``name``, without a copy if possible."""
        raise NotImplementedError

    def read(self, name: str, box: Box) -> torch.Tensor:
        """The block ``box`` of ``name`` as a CPU tensor; may be a view: do not write into it."""
        raise NotImplementedError

    def write(self, name: str, box: Box, block: torch.Tensor) -> None:
        raise NotImplementedError

    def add(self, name: str, box: Box, block: torch.Tensor) -> None:
        """Add ``block`` into the block ``box`` of ``name`` (gradients from several readers)."""
        self.write(name, box, self.read(name, box) + block.detach().cpu())

    def zeros(self, name: str, shape: Sequence[int], dtype: torch.dtype,
              chunks: Sequence[int]) -> None:  # fmt: skip
        """A new array of zeros (a gradient before any reader has added to it)."""
        raise NotImplementedError

    def whole(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def free(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the store holds outside this process (files)."""


class MemoryStore(Store):
    """CPU tensors in this process (pinned when the compute device is a GPU)."""

    def __init__(self, pin: bool = False) -> None:
        self.arrays: dict[str, torch.Tensor] = {}
        self.pin = pin

    def create(self, name: str, shape: Sequence[int], dtype: torch.dtype,
               chunks: Sequence[int]) -> None:  # fmt: skip
        self.arrays[name] = torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pin)

    def zeros(self, name: str, shape: Sequence[int], dtype: torch.dtype,
              chunks: Sequence[int]) -> None:  # fmt: skip
        self.arrays[name] = torch.zeros(tuple(shape), dtype=dtype, pin_memory=self.pin)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.arrays[name] = tensor.cpu()

    def add(self, name: str, box: Box, block: torch.Tensor) -> None:
        self.arrays[name][_index(box)].add_(block.detach().to("cpu", non_blocking=False))

    def read(self, name: str, box: Box) -> torch.Tensor:
        return self.arrays[name][_index(box)]

    def write(self, name: str, box: Box, block: torch.Tensor) -> None:
        self.arrays[name][_index(box)].copy_(block, non_blocking=False)

    def whole(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    def free(self, name: str) -> None:
        self.arrays.pop(name, None)


class ZarrStore(Store):
    """One zarr array per node, in a new folder inside ``path`` (removed on ``close``)."""

    def __init__(self, path: str | Path) -> None:
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise DataError(f"store={str(folder)!r} is a file; give a folder for the zarr store")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="layerwise-", dir=folder))
        self.group = zarr.open_group(str(self.path), mode="w")
        self.dtypes: dict[str, torch.dtype] = {}

    def create(self, name: str, shape: Sequence[int], dtype: torch.dtype,
               chunks: Sequence[int]) -> None:  # fmt: skip
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.group.create_array(name, shape=tuple(shape), dtype=np_dtype,
                                chunks=tuple(chunks), fill_value=0)  # fmt: skip
        self.dtypes[name] = dtype

    def zeros(self, name: str, shape: Sequence[int], dtype: torch.dtype,
              chunks: Sequence[int]) -> None:  # fmt: skip
        self.create(name, shape, dtype, chunks)  # zarr's fill value is 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu()
        self.create(name, t.shape, t.dtype, t.shape)
        self.group[name][...] = t.numpy()

    def read(self, name: str, box: Box) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.group[name][_index(box)]))

    def write(self, name: str, box: Box, block: torch.Tensor) -> None:
        self.group[name][_index(box)] = block.detach().cpu().numpy()

    def whole(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.group[name][...]))

    def free(self, name: str) -> None:
        if name in self.group:
            del self.group[name]

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def open_store(store: str | Path | Store, pin: bool = False) -> Store:
    """``"memory"``, a folder for a ``ZarrStore``, or a ``Store`` as it is."""
    if isinstance(store, Store):
        return store
    if store == "memory":
        return MemoryStore(pin)
    return ZarrStore(store)
