"""The sections of a run config other than the model: data, process layout, optimisation,
memory savers. Nested dataclasses, each field documented, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from haloseg.config.checks import check_choice, check_ignore_label, check_positive
from haloseg.data.context import CONTEXT_MIN_SIDE, CONTEXT_TASKS
from haloseg.data.normalize import NORMALIZE
from haloseg.errors import ConfigError

__all__ = [
    "DATA_KINDS",
    "MEMORY_FORMATS",
    "PARALLEL_MODES",
    "PIPELINE_SCHEDULES",
    "SWAP_POLICIES",
    "SYNTHETIC_CLASSES",
    "DataConfig",
    "MemoryConfig",
    "ParallelConfig",
    "TrainConfig",
]

DATA_KINDS = ("synthetic", "msd", "nnunet", "tiff", "zarr")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
SYNTHETIC_CLASSES = 3
"""Classes of synthetic data whose ``data.num_classes`` is unset."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are prepared."""

    kind: str = "synthetic"
    """synthetic | msd (Decathlon folder) | nnunet (nnU-Net v2 raw folder) | tiff (folder
    with images/ and labels/) | zarr."""
    path: str | None = None
    """Dataset folder or zarr store (not for synthetic)."""
    num_classes: int | None = None
    """Classes including background; read from the dataset where it says (MSD, zarr);
    synthetic data has 3 if unset."""
    shape: list[int] = field(default_factory=lambda: [128, 128])
    """Synthetic image shape (2-D or 3-D)."""
    num_images: int = 48
    """Synthetic images in all (training + validation)."""
    in_channels: int = 1
    """Synthetic image channels."""
    noise: float = 0.4
    """Synthetic noise standard deviation."""
    seed: int = 0
    """Synthetic data seed."""
    task: str = "ellipses"
    """Synthetic task: ellipses (classes by brightness) | size | marker | control (classes
    that need context beyond a patch, and a local control; see haloseg.data.context)."""
    val_fraction: float = 0.25
    """Share of the samples held out for validation (the last ones)."""
    normalize: str = "zscore"
    """Per image and channel, with whole-image statistics: zscore | zscore_nonzero | none."""
    augment: bool = True
    """Random flips (and 90-degree turns of square planes), identical on every block."""
    pad: bool = True
    """Pad images the network or grid cannot split to the next valid size (padding is
    ignored by loss and metrics); if false, such images are an error naming valid sizes."""
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Named unions of labels scored as extra Dice metrics, e.g. BraTS WT: [1, 2, 3]."""
    ignore_label: int | None = None
    """Label value excluded from loss and metrics (e.g. 255 for nodata or unannotated
    voxels); must lie outside the classes 0..num_classes-1."""

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, DATA_KINDS)
        check_choice("data.normalize", self.normalize, NORMALIZE)
        if self.kind != "synthetic" and not self.path:
            raise ConfigError(f"data.kind={self.kind!r} needs data.path (the dataset folder)")
        if len(self.shape) not in (2, 3) or min(self.shape) < 8:
            raise ConfigError(f"data.shape={self.shape} must be 2 or 3 sides of at least 8")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"data.num_classes={self.num_classes} must be >= 2")
        for name, labels in self.regions.items():
            if name == "mean" or name.startswith("class") or not labels:
                raise ConfigError(
                    f"data.regions[{name!r}]={labels}: a region needs a name other than 'mean' "
                    "or 'classN' (those are per-class metrics) and at least one label"
                )
        if self.ignore_label is not None:
            check_positive("data.ignore_label", self.ignore_label, zero=True)
            check_ignore_label(self.ignore_label, self.num_classes)
        check_positive("data.num_images", self.num_images)
        check_positive("data.in_channels", self.in_channels)
        check_positive("data.noise", self.noise, zero=True)
        check_positive("data.seed", self.seed, zero=True)
        check_choice("data.task", self.task, ("ellipses", *CONTEXT_TASKS))
        if self.task != "ellipses":
            self._check_context_task()

    def _check_context_task(self) -> None:
        """The context tasks are synthetic, of 1 channel, 3 classes and sides >= 32."""
        if (
            self.kind != "synthetic"
            or self.in_channels != 1
            or self.num_classes not in (None, 3)
            or min(self.shape) < CONTEXT_MIN_SIDE
        ):
            raise ConfigError(
                f"data.task={self.task!r} makes synthetic images of 1 channel, 3 classes and "
                f"sides >= {CONTEXT_MIN_SIDE}; got data.kind={self.kind!r}, data.in_channels="
                f"{self.in_channels}, data.num_classes={self.num_classes}, data.shape={self.shape}"
            )


PARALLEL_MODES = ("halo", "tiles")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the processes are arranged: ``pipeline`` stages x ``data`` replicas x a spatial
    ``grid`` each."""

    grid: list[int] | None = None
    """Spatial process grid, one extent per spatial dim (all ones if unset)."""
    data: int = 1
    """Data-parallel replicas; pipeline x data x prod(grid) must equal the number of
    processes."""
    mode: str = "halo"
    """How the grid splits an image: halo (blocks exchange halos before every layer; exact
    for every network) | tiles (overlap tiles: each process trains on its tile plus the
    receptive-field halo with no communication inside the network; exact for networks of
    local layers, i.e. no normalisation over the image, or BatchNorm frozen)."""
    pipeline: int = 1
    """Pipeline stages: the network's blocks split into this many consecutive stages, each
    on its own processes (GPipe-style model parallelism)."""
    microbatches: int | None = None
    """Micro-batches per batch in a pipeline (must divide train.batch_size; one image each
    if unset)."""
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe (all forwards, then all backwards) | 1f1b (one forward,
    one backward; fewer activations held)."""
    balance: list[int] | None = None
    """Blocks per pipeline stage (as many entries as stages); measured and balanced
    automatically if unset (haloseg plan --pipeline N shows the balance)."""

    def __post_init__(self) -> None:
        if self.grid is not None and (not self.grid or min(self.grid) < 1):
            raise ConfigError(f"parallel.grid={self.grid} must be positive extents like [2, 2]")
        check_positive("parallel.data", self.data)
        check_choice("parallel.mode", self.mode, PARALLEL_MODES)
        check_positive("parallel.pipeline", self.pipeline)
        check_choice("parallel.schedule", self.schedule, PIPELINE_SCHEDULES)
        if self.microbatches is not None:
            check_positive("parallel.microbatches", self.microbatches)
        if self.balance is not None and (
            len(self.balance) != self.pipeline or min(self.balance) < 1
        ):
            raise ConfigError(
                f"parallel.balance={self.balance} must give a positive number of blocks for "
                f"each of the parallel.pipeline={self.pipeline} stages"
            )
        if self.pipeline > 1 and self.mode == "tiles":
            raise ConfigError(
                f"parallel.pipeline={self.pipeline} runs with parallel.mode=halo only; drop "
                "parallel.pipeline or set parallel.mode=halo"
            )

    @property
    def size(self) -> int:
        return self.pipeline * self.data * math.prod(self.grid or [1])


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 1
    """Images per data replica per micro-step."""
    accumulate: int = 1
    """Micro-steps whose gradients add up before each optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up before the cosine decay."""
    schedule: str = "cosine"
    """cosine | constant (after warm-up)."""
    dice_weight: float = 1.0
    """Weight of the soft Dice loss."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy loss."""
    amp: bool = False
    """bfloat16 autocast (GPU only; ignored on CPU)."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 | float64."""
    memory_format: str = "auto"
    """Layout of weights and activations: auto (channels-last where it is faster: on the CPU,
    and on a GPU under ``amp``) | channels_last | contiguous. Results are the same."""
    val_every: int = 50
    """Validate every this many steps (and at the end)."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (and at the end)."""
    log_every: int = 10
    """Log training loss to TensorBoard every this many steps."""
    seed: int = 0
    """Seeds weights, sample order and augmentation."""
    freeze_norm: bool = False
    """Keep BatchNorm in eval mode while training: it normalises with its running statistics
    (frozen, e.g. pre-trained) and only its affine weights train; makes a BatchNorm network
    local, as parallel.mode=tiles needs."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulate", "val_every", "checkpoint_every"):
            check_positive(f"train.{name}", getattr(self, name))
        check_positive("train.lr", self.lr)
        check_positive("train.log_every", self.log_every)
        for name in ("warmup_steps", "weight_decay", "dice_weight", "ce_weight", "seed"):
            check_positive(f"train.{name}", getattr(self, name), zero=True)
        check_choice("train.schedule", self.schedule, ("cosine", "constant"))
        check_choice("train.dtype", self.dtype, ("float32", "float64"))
        check_choice("train.memory_format", self.memory_format, MEMORY_FORMATS)


SWAP_POLICIES = ("none", "all", "skips", "min_bytes", "budget")


@dataclass(kw_only=True)
class MemoryConfig:
    """Memory savers: activation swapping to host memory and checkpointing per U-Net level."""

    swap: str = "none"
    """Saved activations to host: none | all | skips (the encoder levels that feed skip
    connections) | min_bytes (tensors of at least swap_min_bytes) | budget (what exceeds
    swap_budget)."""
    swap_min_bytes: int = 1 << 20
    """Smallest tensor swapped by the min_bytes policy."""
    swap_budget: str | None = None
    """Device bytes of saved activations kept before swapping starts, e.g. 20GB (budget)."""
    prefetch: int = 2
    """Swapped tensors brought back ahead of their use in backward."""
    checkpoint: bool = False
    """Keep only each U-Net level's input and recompute the level in backward."""
    device_memory: str | None = None
    """Memory of one device, for ``haloseg train --plan`` to say whether the run fits; with
    ``executor: layerwise`` and no ``block``, the budget the block is picked for."""
    executor: str = "autograd"
    """autograd (the network as it is) | layerwise (one process: every image whole, node by
    node over blocks, each layer's output in host memory or a zarr store on disk)."""
    block: int | list[int] | None = None
    """Voxels per spatial dim of a layer-wise block (one value for all dims, or one each);
    default: the largest block within ``device_memory``, else 64."""
    store: str = "memory"
    """Where layer-wise activations live: memory (host) or a folder for zarr arrays."""

    def __post_init__(self) -> None:
        check_choice("memory.swap", self.swap, SWAP_POLICIES)
        check_choice("memory.executor", self.executor, ("autograd", "layerwise"))
        if self.block is not None:
            if isinstance(self.block, int) and not isinstance(self.block, bool):
                self.block = [self.block]
            if (
                not isinstance(self.block, list)
                or not self.block
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.block)
            ):
                raise ConfigError(
                    f"memory.block={self.block!r} must be one integer >= 1 or one per "
                    "spatial dim, e.g. memory.block=64 or memory.block=[64,64,32]"
                )
            if self.executor != "layerwise":
                raise ConfigError(
                    f"memory.block={self.block} applies to memory.executor=layerwise only; "
                    "drop it or set memory.executor=layerwise"
                )
        check_positive("memory.prefetch", self.prefetch, zero=True)
        check_positive("memory.swap_min_bytes", self.swap_min_bytes)
        if self.swap == "budget" and self.swap_budget is None:
            raise ConfigError(
                "memory.swap=budget needs memory.swap_budget, e.g. memory.swap_budget=20GB"
            )
        if self.swap_budget is not None and self.swap != "budget":
            raise ConfigError(
                f"memory.swap_budget={self.swap_budget} applies to memory.swap=budget only "
                f"(memory.swap is {self.swap!r}); drop it or set memory.swap=budget"
            )
        from haloseg.units import parse_bytes

        if self.swap_budget is not None:
            parse_bytes(self.swap_budget)
        if self.device_memory is not None and parse_bytes(self.device_memory) == 0:
            raise ConfigError(f"memory.device_memory={self.device_memory} must be > 0, e.g. 80GB")
