"""Memory: activation swapping to host, checkpointing per U-Net level, and the memory planner."""

from haloseg.memory.checkpoint import checkpoint_levels, unet_levels
from haloseg.memory.model import MemoryBreakdown, StepSpec, step_memory
from haloseg.memory.planner import Mix, PlanRow, plan, tiled_redundancy, unet_spec
from haloseg.memory.swap import SWAP_POLICIES, ActivationSwapper, SwapStats, swap_activations
from haloseg.memory.tracker import LiveBytes

__all__ = [
    "SWAP_POLICIES",
    "ActivationSwapper",
    "LiveBytes",
    "MemoryBreakdown",
    "Mix",
    "PlanRow",
    "StepSpec",
    "SwapStats",
    "checkpoint_levels",
    "plan",
    "step_memory",
    "swap_activations",
    "tiled_redundancy",
    "unet_levels",
    "unet_spec",
]
