"""Pipeline model parallelism: a network's blocks cut into stages on
``torch.distributed.pipelining``, U-Net skips carried across stage boundaries.

``Pipeline`` and the stage machinery load ``torch.distributed.pipelining`` (and with it
TorchDynamo, seconds to import) on first use, not when haloseg is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from haloseg.pipeline.blocks import Block, SkipSequence, unet_blocks
from haloseg.pipeline.mesh import PipelineLayout, pipeline_layout

__all__ = [
    "Block",
    "Pipeline",
    "PipelineLayout",
    "SkipSequence",
    "Stage",
    "gather_stages",
    "pack_target",
    "pipeline_layout",
    "segmentation_loss",
    "unet_blocks",
    "unpack_target",
]

_LAZY = {
    "Pipeline": "haloseg.pipeline.runner",
    "Stage": "haloseg.pipeline.stage",
    "gather_stages": "haloseg.pipeline.state",
    "pack_target": "haloseg.pipeline.loss",
    "segmentation_loss": "haloseg.pipeline.loss",
    "unpack_target": "haloseg.pipeline.loss",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haloseg.pipeline' has no attribute {name!r}")
