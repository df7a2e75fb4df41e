"""``infer``: a trained run applied to an image file (or a folder of them), into files that
keep the input's geometry.

The run's spec rebuilds the network and replays its preprocessing (normalisation with
whole-image statistics from a streaming pass). Networks of local layers run tile by tile:
under torchrun every process takes every n-th tile and writes its cores into the shared
output (a memmap or a zarr array whose chunks are the tile cores, so no two processes write
one chunk). Networks whose statistics span the image run one whole-image forward pass,
split over the processes by the spatial engine. Rank 0 creates and finishes the output.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
from haloseg.inference.cases import find_cases, stack_channels
from haloseg.inference.io import (
    SUFFIXES,
    Output,
    create_output,
    open_image,
    read_geometry,
    reopen_output,
)
from haloseg.inference.plan import Plan, plan_image
from haloseg.inference.predict import predict_tiled
from haloseg.inference.preprocess import Normalization, image_moments
from haloseg.inference.whole import predict_layerwise, predict_whole_image
from haloseg.models import build_network
from haloseg.training.checkpoint import load_checkpoint
from haloseg.training.setup import agree
from haloseg.training.spec import RunSpec, spec_from_state

__all__ = ["infer", "infer_folder", "load_model", "open_source"]

log = logging.getLogger(__name__)

Source = str | os.PathLike | Sequence[str | os.PathLike]
"""An image file, or one file per channel (an nnU-Net case: ``CASE_0000.nii.gz``, ...)."""


def _read_state(path: Path) -> dict[str, Any] | None:
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a file torch cannot read is a bad file
            raise DataError(f"{path} is not a readable checkpoint ({e})") from None
    return load_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)


def load_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, RunSpec]:
    """The model of a run folder's latest checkpoint (or of a checkpoint file), in eval
    mode, and the run's spec (how it was built, its preprocessing, classes and labels)."""
    path = Path(checkpoint)
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist; give a run folder or a .pt file")
    state = _read_state(path)
    if state is None or "model" not in state:
        raise DataError(f"{checkpoint} holds no haloseg checkpoint; give a run folder or a .pt")
    spec = spec_from_state(state, str(checkpoint))
    model = build_network(spec.model)
    model.load_state_dict(state["model"])
    return model.to(getattr(torch, spec.dtype)).eval(), spec


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


def _rank_world(device: str) -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Halos of GPU blocks travel by NCCL; small CPU tensors (agreement, sums) by gloo.
        gpu = torch.device(device).type == "cuda"
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(device: str) -> str:
    """``cuda`` under torchrun is this process's GPU (LOCAL_RANK), not every process's 0."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(torch.device(device))
    return device


def _same_tiles(plan: Plan, world: int) -> Plan:
    """The smallest tile any process chose: processes share out chunks and tiles by index,
    so they must cut the image alike (a budget leaves each its own resident memory)."""
    if world == 1 or plan.core is None:
        return plan
    core = torch.tensor(plan.core, dtype=torch.int64)
    dist.all_reduce(core, op=dist.ReduceOp.MIN)
    core = tuple(int(c) for c in core)
    return dataclasses.replace(plan, core=core, chunks=core)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def open_source(source: Source, spec: RunSpec) -> Any:
    """The ``(C, *spatial)`` view of an image file or of one file per channel."""
    if isinstance(source, (str, os.PathLike)):
        return open_image(source, spec.spatial_dims, spec.in_channels)
    return stack_channels([open_image(p, spec.spatial_dims, 1) for p in source], source)


def _warn_geometry(source: Source, spec: RunSpec) -> None:
    """Warn when the image's voxel spacing or axis order is not the training images'."""
    first = Path(source if isinstance(source, (str, os.PathLike)) else source[0])
    if not first.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    header = nib.load(first)
    fix = "resample/reorient it like the training images for predictions like validation's"
    if spec.spacing is not None:
        spacing = header.header.get_zooms()[: len(spec.spacing)]
        if any(abs(a / b - 1) > 0.1 for a, b in zip(spacing, spec.spacing, strict=False) if b):
            shown = tuple(round(float(v), 3) for v in spacing)
            log.warning("%s has voxel spacing %s but the model was trained at %s; %s", first,
                        shown, tuple(spec.spacing), fix)  # fmt: skip
    axes = "".join(nib.aff2axcodes(header.affine))
    if spec.orientation is not None and axes != spec.orientation:
        log.warning("%s has axes %s but the model was trained on %s images; %s", first, axes,
                    spec.orientation, fix)  # fmt: skip


def infer(
    checkpoint: str | os.PathLike,
    source: Source,
    target: str | os.PathLike,
    *,
    tile: Sequence[int] | None = None,
    max_memory: int | None = None,
    output: str = "labels",
    batch_size: int = 1,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    preview: str | os.PathLike | None = None,
    grid: Sequence[int] | None = None,
    model: tuple[nn.Module, RunSpec] | None = None,
    executor: str = "auto",
    block: Sequence[int] | None = None,
    store: str | Path = "memory",
) -> dict[str, Any]:
    """Predict ``source`` into ``target`` exactly as whole-image inference would, after the
    training's intensity normalisation; ``target`` keeps the input's geometry.

    Networks with local layers run tile by tile (every process of a torchrun launch takes
    every n-th tile); networks whose statistics span the image (InstanceNorm, GroupNorm), or
    any network when ``grid`` is given, run one whole-image forward pass split over the
    processes' ``grid``. ``executor="layerwise"``: one whole-image pass in this process,
    layer by layer over blocks of ``block`` voxels (or the largest ``max_memory`` bytes of
    the device hold), every layer's output in ``store`` ("memory" or a folder for zarr).
    ``model``: a ``load_model`` result to reuse across images.
    """
    _release_large_frees()
    net, spec = model if model is not None else load_model(checkpoint)
    name = str(source if isinstance(source, (str, os.PathLike)) else source[0])
    image = open_source(source, spec)
    _warn_geometry(source, spec)
    device = _device(device)
    rank, world = _rank_world(device)
    spatial = tuple(image.shape[1:])
    plan = agree(lambda: plan_image(net.to(device), spec, spatial, tile=tile, grid=grid,
                                    max_memory=max_memory, batch_size=batch_size,
                                    world=world, executor=executor, block=block))  # fmt: skip
    plan = _same_tiles(plan, world)
    classes = spec.model["out_channels"]
    shape = spatial if output == "labels" else (classes, *spatial)
    dtype = (
        np.uint8 if output == "labels" else np.float16 if output == "probabilities" else np.float32
    )
    chunks = plan.chunks if output == "labels" else (classes, *plan.chunks)
    nodata = (255 if classes < 255 else None) if output == "labels" else float("nan")
    # Rank 0 alone creates the output; its refusal (an existing file...) is every rank's.
    out = agree(lambda: create_output(
        target, shape, dtype, chunks, geometry=read_geometry(name), nodata=nodata,
        channels=output != "labels",
    ) if rank == 0 else None)  # fmt: skip
    array = out.array if out is not None else reopen_output(
        Output(Path(target), None, _staged(Path(target)), None)
    )  # fmt: skip
    run = functools.partial(_predict, net, image, plan, array, output, spec, name, device,
                            batch_size, progress, rank, world, store)  # fmt: skip
    try:
        agree(run)  # one rank's bad tile is every rank's error, not a wait at the barrier
    except BaseException:
        if out is not None:
            out.discard()
        raise
    mode = "tiles" if plan.rf else "layerwise" if plan.block else "whole"
    result = {"shape": list(spatial), "processes": world, "mode": mode,
              "normalize": spec.normalize}  # fmt: skip
    if plan.rf is not None:
        result.update(tile=list(plan.core), halo=list(plan.rf.halo), alignment=plan.rf.alignment)
    elif plan.block is not None:
        result.update(block=list(plan.block))
    else:
        result.update(grid=list(plan.dec.grid))
    if out is not None:
        out.finish()
        if preview is not None:
            save_preview(image, Path(target), output, preview)
    return result


def _predict(
    net: nn.Module, image: Any, plan: Plan, out: Any, output: str, spec: RunSpec, name: str,
    device: str, batch_size: int, progress: Callable[[int, int], None] | None,
    rank: int, world: int, store: str | Path,
) -> None:  # fmt: skip
    if plan.block is not None:
        predict_layerwise(net, image, plan.align, plan.block, out=out, output=output,
                          normalize=spec.normalize, name=name, device=device,
                          store=store)  # fmt: skip
        return
    if plan.dec is not None:
        # spatial_parallel converts in place; the caller's model serves the next image.
        predict_whole_image(copy.deepcopy(net), image, plan.dec, out=out, output=output,
                            normalize=spec.normalize, name=name, device=device)  # fmt: skip
        return
    norm = Normalization("none")
    if spec.normalize != "none":
        # Each process reads its share of the chunks; a bad chunk is every rank's error.
        moments = agree(lambda: image_moments(image, spec.normalize, plan.chunks, name=name,
                                              part=(rank, world)))  # fmt: skip
        norm = Normalization.from_moments(spec.normalize, _sum_over_ranks(moments))
    predict_tiled(net, image, plan.core, out=out, output=output, batch_size=batch_size,
                  rf=plan.rf, progress=progress, part=(rank, world), normalize=norm,
                  name=name)  # fmt: skip


def _staged(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    return tmp if target.suffix == ".zarr" else tmp.with_name(tmp.name + ".npy")


def save_preview(image: Any, target: Path, output: str, path: str | os.PathLike) -> None:
    """A PNG of the image's first channel with the predicted labels over it, subsampled to
    at most 1024 pixels a side (3-D: the middle slice of the first axis)."""
    from haloseg.inference.io import open_image as _open
    from haloseg.plots import draw_labels, pyplot, save_figure

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
    fig, ax = pyplot().subplots(figsize=(8, 8 * picture.shape[0] / picture.shape[1]))
    ax.imshow(picture, cmap="gray")
    draw_labels(ax, mask)
    ax.axis("off")
    save_figure(fig, path)


def infer_folder(
    checkpoint: str | os.PathLike,
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    suffix: str | None = None,
    on_case: Callable[[str, int, int, bool], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Predict every case of ``source`` (a folder, or a Decathlon ``dataset.json``'s test
    list) into ``target/CASE.SUFFIX`` (the input's suffix unless ``suffix``), skipping cases
    whose prediction exists (a rerun finishes an interrupted batch). ``on_case(name, number,
    total, skipped)`` reports each case; ``options`` go to ``infer``."""
    loaded = load_model(checkpoint)
    cases = find_cases(source, loaded[1].in_channels)
    folder = Path(target)
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it first")
    results = []
    # Decided once, before anything is written, so every process skips the same cases.
    plans = [(name, image, folder / f"{name}{suffix or _case_suffix(image)}")
             for name, image in cases]  # fmt: skip
    pending = [not out.exists() for _, _, out in plans]
    for number, ((name, image, out), todo) in enumerate(zip(plans, pending), 1):
        if on_case is not None:
            on_case(name, number, len(plans), not todo)
        if todo:
            result = infer(checkpoint, image, out, model=loaded, **options)
            results.append({"case": name, "output": str(out), **result})
    return results


def _case_suffix(image: str | Sequence[str]) -> str:
    first = Path(image if isinstance(image, str) else image[0]).name.lower()
    return next(s for s in sorted(SUFFIXES, key=len, reverse=True) if first.endswith(s))
