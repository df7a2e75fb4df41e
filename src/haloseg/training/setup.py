"""Everything a run needs before its first step: processes, datasets, model, run folder.

Failures that can strike one rank only (a file missing on one node, a NaN in one block)
go through ``agree``: every rank learns of them and raises the same error, instead of the
others waiting in the next collective until the timeout.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from haloseg.config import SYNTHETIC_CLASSES, DataConfig, RunConfig, check_ignore_label
from haloseg.data.base import Dataset, SampleInfo
from haloseg.errors import ConfigError, DataError, HalosegError
from haloseg.memory.checkpoint import checkpoint_levels
from haloseg.models import build_network
from haloseg.parallel import Decomposition, spatial_parallel
from haloseg.parallel.data import data_parallel, data_space_mesh, space_decomposition
from haloseg.pipeline.mesh import PipelineLayout, check_processes, pipeline_layout
from haloseg.training.freeze import freeze_batch_norm
from haloseg.training.tiles import build_tile_model

__all__ = [
    "Layout",
    "Subset",
    "agree",
    "build_datasets",
    "build_model",
    "init_layout",
    "memory_format",
    "prepare_run_folder",
]

T = TypeVar("T")


@dataclass
class Layout:
    """Where this process sits: pipeline stages x ``data`` replicas x a spatial ``grid``."""

    device: torch.device
    dec: Decomposition
    data_rank: int
    data_size: int
    mesh: DeviceMesh | None
    world: int
    halo: tuple[int, ...] | None = None
    """Tiles mode: voxels per side each process reads around its block (None: halo mode)."""
    pipeline: PipelineLayout | None = None
    """Pipeline stages (``parallel.pipeline`` > 1): this rank's stage and its groups."""

    @property
    def is_main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("data") if self.mesh is not None else None


def agree(fn: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
    """Run ``fn`` on every rank of ``group`` (all if None); if it raises on any, raise the
    same error on all."""
    error: BaseException | None = None
    try:
        result = fn()
    except HalosegError as e:
        error, result = e, None  # type: ignore[assignment]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    failed = torch.tensor([error is not None], dtype=torch.int64)
    dist.all_reduce(failed, group=group)
    if failed.item():
        messages: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(
            messages, None if error is None else (type(error), str(error)), group=group
        )
        if error is not None:
            raise error
        cls, text = next(m for m in messages if m is not None)
        raise cls(text)
    return result  # type: ignore[return-value]


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is visible; use device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _join_torchrun(device: torch.device) -> None:
    """Join the process group of torchrun's environment (MASTER_ADDR, RANK, ...).

    Under elastic restarts torchrun keeps its key-value store, so the keys where the last
    attempt's processes published their addresses are still there: a new process could read
    a dead peer's address before its successor overwrites it. Keys under a prefix of the
    restart count keep every attempt apart.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=int(os.environ.get("HALOSEG_GLOO_TIMEOUT", "300")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=rank == 0 and not agent_store, timeout=timeout,
    )  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # On GPUs, small CPU tensors (agreement flags, metric sums) still go through gloo.
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
        store=dist.PrefixStore(f"haloseg/attempt-{attempt}", store),
        rank=rank, world_size=world, timeout=timeout,
    )  # fmt: skip


def init_layout(cfg: RunConfig, spatial_dims: int) -> Layout:
    """Join the process group torchrun set up (if any) and arrange it as pipeline stages x
    data x space."""
    device = _device(cfg.device)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _join_torchrun(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    grid = list(cfg.parallel.grid or [1] * spatial_dims)
    if len(grid) != spatial_dims:
        raise ConfigError(
            f"parallel.grid={grid} has {len(grid)} extents but the images are {spatial_dims}-D; "
            f"give one extent per spatial dimension"
        )
    data, stages = cfg.parallel.data, cfg.parallel.pipeline
    check_processes(stages, data, grid, world)
    if stages > 1:
        place = pipeline_layout(stages, data=data, grid=grid, device_type=device.type)
        return Layout(device, place.dec, place.data_rank, data, place.mesh, world,
                      pipeline=place)  # fmt: skip
    if data > 1:
        mesh = data_space_mesh(data, grid, device.type)
        return Layout(device, space_decomposition(mesh, grid), mesh.get_local_rank("data"),
                      data, mesh, world)  # fmt: skip
    return Layout(device, Decomposition(grid), 0, 1, None, world)


class Subset:
    """The samples ``indices`` of ``dataset``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.spatial_dims = dataset.spatial_dims
        self.in_channels = dataset.in_channels
        self.num_classes = dataset.num_classes
        # What a dataset may say of itself (nnU-Net's dataset.json, the Decathlon's).
        for name in ("channel_names", "label_names", "regions", "ignore_label"):
            setattr(self, name, getattr(dataset, name, None))

    def __len__(self) -> int:
        return len(self.indices)

    def info(self, index: int) -> SampleInfo:
        return self.dataset.info(self.indices[index])

    def read(self, index: int, box: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.read(self.indices[index], box)


def _open_dataset(cfg: DataConfig) -> Dataset:
    ignore = cfg.ignore_label
    if cfg.kind == "synthetic" and cfg.task != "ellipses":
        from haloseg.data.context import ContextDataset

        return ContextDataset(cfg.task, cfg.shape, cfg.num_images, seed=cfg.seed, noise=cfg.noise)
    if cfg.kind == "synthetic":
        from haloseg.data.synthetic import EllipseDataset

        return EllipseDataset(
            cfg.shape, num_images=cfg.num_images,
            num_classes=cfg.num_classes or SYNTHETIC_CLASSES,
            in_channels=cfg.in_channels, noise=cfg.noise, seed=cfg.seed,
        )  # fmt: skip
    if cfg.kind == "msd":
        from haloseg.data.msd import MSDDataset

        return MSDDataset(cfg.path, ignore_label=ignore)
    if cfg.kind == "nnunet":
        from haloseg.data.nnunet import NnUNetDataset

        return NnUNetDataset(cfg.path, ignore_label=ignore)
    if cfg.kind == "tiff":
        from haloseg.data.tiff import TiffDataset

        if cfg.num_classes is None:
            raise ConfigError("data.kind='tiff' needs data.num_classes (label rasters do not say)")
        return TiffDataset.from_folder(cfg.path, num_classes=cfg.num_classes, ignore_label=ignore)
    from haloseg.data.zarr_arrays import ZarrDataset

    return ZarrDataset(cfg.path, num_classes=cfg.num_classes, ignore_label=ignore)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(training, validation) datasets: the last ``val_fraction`` of the samples validate."""
    dataset = _open_dataset(cfg)
    check_ignore_label(cfg.ignore_label, dataset.num_classes)
    n = len(dataset)
    if n == 0:
        raise DataError(f"the {cfg.kind} dataset at {cfg.path} holds no samples")
    n_val = min(n - 1, math.ceil(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if n - n_val < 1:
        raise DataError(f"the {cfg.kind} dataset holds {n} sample(s): too few to train on")
    return Subset(dataset, range(n - n_val)), Subset(dataset, range(n - n_val, n))


def memory_format(
    choice: str, device: torch.device, amp: bool, spatial_dims: int
) -> torch.memory_format:
    """The layout ``train.memory_format=choice`` means for ``spatial_dims``-D images.

    ``auto`` is channels-last where it measures faster: on the CPU, where oneDNN's
    convolutions run 1.4x faster in it (docs/benchmarks.md), and on a GPU under autocast,
    where cuDNN's reduced-precision kernels are NHWC; plain fp32 on a GPU stays contiguous.
    """
    if choice == "contiguous" or spatial_dims not in (2, 3):
        return torch.contiguous_format
    if choice == "auto" and device.type != "cpu" and not (device.type == "cuda" and amp):
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def build_model(
    cfg: RunConfig, dataset: Dataset, layout: Layout, dtype: torch.dtype,
    fmt: torch.memory_format = torch.contiguous_format,
) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """(model to train, the plain module holding the weights) on this rank, its weights in
    the memory format ``fmt``."""
    torch.manual_seed(cfg.train.seed)
    entry = cfg.model.network(dataset.spatial_dims, dataset.in_channels, dataset.num_classes)
    model = build_network(entry).to(device=layout.device, dtype=dtype, memory_format=fmt)
    if cfg.train.freeze_norm:
        freeze_batch_norm(model)
    if cfg.parallel.mode == "tiles":
        return build_tile_model(cfg, model, layout)
    if cfg.memory.executor == "layerwise":
        from haloseg.training.layerwise import build_layerwise_model

        return build_layerwise_model(cfg, model, dataset, layout, dtype), model
    if layout.pipeline is not None:  # converted and cut into stages by haloseg.pipeline
        return model, model
    spatial_parallel(model, layout.dec, sync_gradients=layout.mesh is None)
    if cfg.memory.checkpoint:
        checkpoint_levels(model)
    if layout.mesh is not None:
        return data_parallel(model, layout.mesh), model
    return model, model


def prepare_run_folder(folder: str, *, resume: bool) -> Path:
    """Create the run folder and check it is writable; refuse to overwrite a finished run
    unless resuming."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"run folder {folder!r} is not writable ({e.strerror}); choose another with "
            "output_dir=PATH"
        ) from None
    if not resume and (path / "checkpoints" / "latest.json").exists():
        raise ConfigError(
            f"run folder {folder!r} already holds a run; pass --resume to continue it or "
            "choose another output_dir"
        )
    return path
