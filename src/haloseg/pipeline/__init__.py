"""Pipeline model parallelism: a network's blocks cut into stages on
``torch.distributed.pipelining``, U-Net skips carried across stage boundaries."""

from haloseg.pipeline.blocks import Block, SkipSequence, unet_blocks

__all__ = ["Block", "SkipSequence", "unet_blocks"]
