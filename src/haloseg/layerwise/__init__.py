"""Exact whole-image execution on one device, layer by layer over spatial blocks: every
layer's whole output in host memory (or zarr on disk), one block of one layer on the device."""

from haloseg.layerwise.executor import (
    LayerwiseExecutor,
    LayerwiseReport,
    NodeCount,
    run_layerwise,
)
from haloseg.layerwise.module import LayerwiseModule
from haloseg.layerwise.store import MemoryStore, Store, ZarrStore

__all__ = [
    "LayerwiseExecutor",
    "LayerwiseModule",
    "LayerwiseReport",
    "MemoryStore",
    "NodeCount",
    "Store",
    "ZarrStore",
    "run_layerwise",
]
