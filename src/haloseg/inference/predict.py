"""``predict_tiled``: whole-image inference, exactly, one tile at a time.

Tiles are read ahead on a background thread while the model runs on the previous batch; on
a GPU the batch goes through pinned memory and an asynchronous copy. Only tile-sized
buffers exist: outputs go straight into the target array (memory, memmap or zarr) as
labels (uint8 arg-max) or scores (float16 by default).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from haloseg.errors import ConfigError
from haloseg.inference.preprocess import Normalization, image_statistics
from haloseg.inference.receptive import ReceptiveField, receptive_field
from haloseg.inference.tiles import Merger, Tile, aligned_tile, batches, plan_tiles, read_tile

__all__ = ["predict_tiled", "predict_whole"]

log = logging.getLogger(__name__)


def predict_whole(model: nn.Module, image: torch.Tensor, alignment: int) -> torch.Tensor:
    """The reference: ``image (N, C, *spatial)`` zero-padded at the high end to a multiple
    of ``alignment``, one forward pass, cropped back."""
    shape = image.shape[2:]
    pad = []
    for n in reversed(shape):
        pad += [0, -(-n // alignment) * alignment - n]
    with torch.no_grad():
        out = model(F.pad(image, pad))
    return out[(slice(None), slice(None), *(slice(0, n) for n in shape))]


def _upload(x: torch.Tensor, device: torch.device, stream: Any) -> tuple[torch.Tensor, Any]:
    """Copy a batch to the GPU on the copy stream; the event marks when it has arrived."""
    with torch.cuda.stream(stream):
        x = x.pin_memory().to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return x, done


def _read_ahead(
    source: Any,
    groups: list[list[Tile]],
    depth: int,
    device: torch.device,
    read: Callable[[Any, Tile], np.ndarray] = read_tile,
) -> Iterator[tuple[list[Tile], torch.Tensor]]:
    """Yield (tiles, stacked input) while a thread reads the next ``depth`` batches.

    On a GPU the thread also uploads each batch on a stream of its own, so the copy of the
    next batch overlaps the model running on the current one.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def work() -> None:
        try:
            for group in groups:
                x = torch.from_numpy(np.stack([read(source, t) for t in group]))
                item = (group, *(_upload(x, device, stream) if stream else (x, None)))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="haloseg-tile-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            group, x, arrived = item
            if arrived is not None:
                # Compute waits for the copy; the tensor's memory waits for the compute.
                torch.cuda.current_stream(device).wait_event(arrived)
                x.record_stream(torch.cuda.current_stream(device))
            yield group, x
    finally:
        stop.set()
        thread.join()


def predict_tiled(
    model: nn.Module,
    image: Any,
    tile_size: Sequence[int],
    *,
    out: Any = None,
    output: str = "labels",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    read_ahead: int = 2,
    rf: ReceptiveField | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] = (0, 1),
    channels_last: bool | None = None,
    normalize: str | Normalization = "none",
    name: str = "the image",
) -> Any:
    """Exactly what one forward pass over the whole ``image`` gives, computed tile by tile.

    ``image``: ``(C, *spatial)``, a NumPy array or anything sliceable (zarr, memmap,
    nibabel proxy). ``tile_size``: each tile's core (rounded up to the network's alignment);
    the halo comes from ``receptive_field``. ``output``: ``labels`` (uint8 arg-max),
    ``probabilities`` or ``logits`` (``(C', *spatial)``). ``out``: where to write (a NumPy
    array, memmap or zarr array of the right shape); allocated in memory if omitted
    (float16 scores). ``progress(done, total)`` is called after every batch. ``part=(k, n)``
    runs only every n-th tile from the k-th (one of n processes writing into a shared ``out``).
    ``channels_last`` (default: on CPU) runs a copy of the model in channels-last memory
    format, whose CPU convolutions are up to 1.6x faster on large tiles. ``normalize``:
    the intensity normalisation the model was trained with (``zscore``, ``zscore_nonzero``
    or ``none``), whose whole-image statistics are gathered first by a pass over tile-sized
    chunks; or a ``Normalization`` already computed (every process of a distributed run
    must use the same). Every tile read is checked for NaN/Inf (an error naming ``name``).
    """
    spatial_dims = len(image.shape) - 1
    if len(tile_size) != spatial_dims:
        raise ConfigError(
            f"tile_size={tuple(tile_size)} has {len(tile_size)} sides but the image "
            f"{tuple(image.shape)} has {spatial_dims} spatial dims after its channel axis"
        )
    model = model.eval()
    rf = rf or receptive_field(model, spatial_dims)
    core = aligned_tile(tile_size, rf.alignment)
    if isinstance(normalize, str):
        normalize = image_statistics(image, normalize, core, name=name)
    normalize = dataclasses.replace(normalize, dtype=next(model.parameters()).dtype)
    tiles = plan_tiles(image.shape[1:], core, rf)
    tiles = tiles[part[0] :: part[1]]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    if channels_last is None:
        channels_last = device.type == "cpu" and spatial_dims in (2, 3)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=fmt)  # the caller's model stays as is
    merger: Merger | None = None
    done = 0
    groups = list(batches(tiles, batch_size))
    with torch.no_grad():
        read = functools.partial(read_tile, transform=normalize, name=name)
        for group, x in _read_ahead(image, groups, read_ahead, device, read):
            x = x.to(device, dtype, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=fmt)
            logits = model(x).float().cpu().numpy()
            if merger is None:
                if out is None:
                    out = _allocate(output, logits.shape[1], image.shape[1:])
                merger = Merger(out, output)
            for tile, y in zip(group, logits, strict=True):
                merger.add(tile, y)
            done += len(group)
            if progress is not None:
                progress(done, len(tiles))
    return out


def _allocate(output: str, classes: int, shape: Sequence[int]) -> np.ndarray:
    if output == "labels":
        return np.zeros(tuple(shape), np.uint8 if classes <= 256 else np.int32)
    return np.zeros((classes, *shape), np.float16 if output == "probabilities" else np.float32)
