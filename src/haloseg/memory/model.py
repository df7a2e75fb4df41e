"""The memory model: a training step of a haloseg U-Net replayed as allocations, no tensors.

``step_memory`` walks the forward of ``UNet`` (and the trainer's Dice + cross-entropy loss)
layer by layer as autograd runs it: which tensors each layer allocates, which it saves for
backward, when Python lets go of them; then the backward in reverse, allocating each
gradient and freeing what autograd frees (a saved tensor after its last use, a gradient
once consumed, the concatenation's gradient when both halves are used). The high-water mark
of the bytes alive is the step's peak. Swapping moves saved tensors to host when saved and
back ahead of their use (``prefetch`` layers early); checkpointing keeps only each level's
input and replays the level before its backward; a spatial grid shrinks every tensor to the
largest block and adds the halo slabs its convolutions keep.

The parts: ``step_spec`` (the step and the prediction), ``simulator`` (the bookkeeping of
bytes and references), ``unet_walk`` (the forward and the loss), ``backward_walk``.
"""

from __future__ import annotations

import math

from haloseg.memory.backward_walk import backward
from haloseg.memory.simulator import Simulator
from haloseg.memory.step_spec import MemoryBreakdown, StepSpec, check_spec
from haloseg.memory.unet_walk import loss_forward, unet_forward

# StepSpec and MemoryBreakdown live in haloseg.memory.step_spec; importers find them here.
__all__ = ["MemoryBreakdown", "StepSpec", "step_memory"]


def step_memory(spec: StepSpec) -> MemoryBreakdown:
    """Predicted peak device bytes of one training step of ``spec``."""
    check_spec(spec)
    sim = Simulator(spec)
    n, e = spec.batch, spec.dtype_bytes
    vox = [math.prod(b // 2**lvl for b in spec.block) for lvl in range(spec.depth + 1)]
    image = sim.new(n * spec.in_channels * vox[0] * 4, grad=False)
    sim.new(n * vox[0] * 8, grad=False)  # labels (int64)
    if spec.loss == "dice_ce":
        sim.new(n * vox[0], grad=False)  # valid mask (bool)
    batch = sim.live
    logits = unet_forward(sim, spec, image, vox, e)
    grads = loss_forward(sim, spec, logits, vox[0])
    backward(sim, spec, grads)
    p_bytes = sim.params * spec.param_bytes
    if spec.grid is not None and math.prod(spec.grid) > 1:
        sim.spike(p_bytes)  # the flat buffer all-reduced by the gradient sum
    # AdamW's step (foreach) holds temporaries of about 0.63x the parameters (measured).
    sim.spike(0.65 * p_bytes)
    buckets = p_bytes if spec.data > 1 else 0  # DDP's gradient buckets
    optimizer = spec.optimizer_states * p_bytes
    return MemoryBreakdown(
        peak=p_bytes + buckets + optimizer + sim.peak,
        parameters=p_bytes,
        gradients=p_bytes + buckets,
        optimizer=optimizer,
        batch=batch,
        activations=sim.peak - batch,
        halos=sim.halo,
        swapped=sim.swapped,
    )
