"""``infer``: a trained checkpoint applied to an image file, tile by tile, into a file.

Under torchrun every process takes every n-th tile and writes its cores into the shared
output (a memmap or a zarr array whose chunks are the tile cores, so no two processes write
one chunk); rank 0 creates and finishes the output.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from haloseg.errors import ConfigError, DataError
from haloseg.inference.budget import tile_for_budget
from haloseg.inference.io import create_output, open_image, reopen_output
from haloseg.inference.predict import predict_tiled
from haloseg.inference.receptive import receptive_field
from haloseg.inference.tiles import aligned_tile
from haloseg.models import unet_preset
from haloseg.resident import resident_kib
from haloseg.training.checkpoint import load_checkpoint

__all__ = ["infer", "load_model"]

log = logging.getLogger(__name__)


def load_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, dict[str, int]]:
    """The model of a run folder's latest checkpoint (or of a checkpoint file), in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist; give a run folder or a .pt file")
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a file torch cannot read is a bad file
            raise DataError(f"{path} is not a readable checkpoint ({e})") from None
    else:
        state = load_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    if state is None or "model" not in state:
        raise DataError(f"{checkpoint} holds no haloseg checkpoint; give a run folder or a .pt")
    args = state.get("model_args") or _args_from_weights(state["model"])
    cfg = state.get("config", {}).get("model", {})
    overrides = {k: v for k, v in cfg.items() if k != "preset" and v is not None}
    model = unet_preset(cfg.get("preset", "small"), **args, **overrides)
    model.load_state_dict(state["model"])
    return model.eval(), args


def _args_from_weights(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    convs = [v for k, v in weights.items() if k.endswith("weight") and v.dim() > 2]
    return {"spatial_dims": convs[0].dim() - 2, "in_channels": convs[0].shape[1],
            "out_channels": convs[-1].shape[0]}  # fmt: skip


def _release_large_frees() -> None:
    """Make glibc return freed blocks of 4 MiB and more to the OS at once.

    By default glibc raises its mmap threshold after the first large free, so later tile
    activations come from the heap and stay resident after they are freed: the process
    would grow past its budget with memory it no longer uses.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def infer(
    checkpoint: str | os.PathLike,
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    tile: Sequence[int] | None = None,
    max_memory: int | None = None,
    output: str = "labels",
    batch_size: int = 1,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    preview: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Predict ``source`` into ``target`` exactly as whole-image inference would."""
    _release_large_frees()
    model, args = load_model(checkpoint)
    dims = args["spatial_dims"]
    model = model.to(device)
    image = open_image(source, dims, args["in_channels"])
    rf = receptive_field(model, dims)
    if tile is None:
        if max_memory is None:
            raise ConfigError("give --tile or --max-memory (e.g. --max-memory 2GB)")
        # The budget covers the whole process: what is resident already is spent.
        budget = max_memory - (resident_kib() or 0) * 1024 - _model_bytes(model)
        tile = tile_for_budget(model, rf, dims, args["in_channels"], args["out_channels"],
                               budget, batch_size=batch_size)  # fmt: skip
    elif len(tile) == 1:
        tile = tuple(tile) * dims
    core = aligned_tile(tile, rf.alignment)
    spatial = tuple(image.shape[1:])
    shape = spatial if output == "labels" else (args["out_channels"], *spatial)
    dtype = (
        np.uint8 if output == "labels" else np.float16 if output == "probabilities" else np.float32
    )
    chunks = core if output == "labels" else (args["out_channels"], *core)
    rank, world = _rank_world()
    out = create_output(target, shape, dtype, chunks) if rank == 0 else None
    if world > 1:
        dist.barrier()
    if out is None:
        from haloseg.inference.io import Output

        array = reopen_output(Output(Path(target), None, _staged(Path(target)), None))
    else:
        array = out.array
    try:
        predict_tiled(model, image, core, out=array, output=output, batch_size=batch_size,
                      rf=rf, progress=progress, part=(rank, world))  # fmt: skip
    except BaseException:
        if out is not None:
            out.discard()
        raise
    if world > 1:
        dist.barrier()
    result = {"tile": list(core), "halo": list(rf.halo), "alignment": rf.alignment,
              "shape": list(spatial), "processes": world}  # fmt: skip
    if out is not None:
        out.finish()
        if preview is not None:
            save_preview(image, Path(target), output, preview)
    return result


def _staged(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    return tmp if target.suffix == ".zarr" else tmp.with_name(tmp.name + ".npy")


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_preview(image: Any, target: Path, output: str, path: str | os.PathLike) -> None:
    """A PNG of the image's first channel with the predicted labels over it, subsampled to
    at most 1024 pixels a side (3-D: the middle slice of the first axis)."""
    from haloseg.inference.io import open_image as _open
    from haloseg.training.report import _atomic_savefig, _pyplot

    if output != "labels":
        log.warning("--preview draws label outputs only; skipped")
        return
    spatial = image.shape[1:]
    labels = _open(target, len(spatial), 1)
    s = max(1, math.ceil(max(spatial[-2:]) / 1024))
    plane: tuple = (slice(None, None, s),) * 2
    lead = (spatial[0] // 2,) if len(spatial) == 3 else ()
    picture = np.asarray(image[(slice(0, 1), *lead, *plane)])[0]
    mask = np.asarray(labels[(slice(0, 1), *lead, *plane)])[0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8 * picture.shape[0] / picture.shape[1]))
    ax.imshow(picture, cmap="gray")
    colours = plt.get_cmap("tab10")(mask % 10)
    colours[..., 3] = np.where(mask > 0, 0.45, 0.0)
    ax.imshow(colours)
    ax.axis("off")
    _atomic_savefig(fig, Path(path))
    plt.close(fig)
