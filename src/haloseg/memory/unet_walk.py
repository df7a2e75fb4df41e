"""The forward of a haloseg ``UNet`` and of the trainer's loss, layer by layer, as the
allocations and saves autograd makes: what each layer allocates, what it saves for backward,
when Python lets go of it. A spatial grid shrinks every tensor to the largest block and adds
the halo slabs its convolutions keep; checkpointing records each level's block as a region
that saves nothing but its input.
"""

from __future__ import annotations

import math

from haloseg.geometry import ops
from haloseg.memory.simulator import Simulator
from haloseg.memory.step_spec import StepSpec

__all__ = ["loss_forward", "unet_forward"]


def _halo_bytes(spec: StepSpec, channels: int, level: int, e: int) -> int:
    """Bytes of the halo slabs a 3x3 convolution keeps on the rank with most neighbours
    (its window per side from the geometry registry's rule of that convolution)."""
    if spec.grid is None or math.prod(spec.grid) == 1:
        return 0
    block = [b // 2**level for b in spec.block]
    rules = ops.conv(len(block), 3, padding=1).axis_rules(block)
    widths = [(-r.in_window(0, 1)[0], r.in_window(0, 1)[1] - 1) for r in rules]
    grown = math.prod(
        b + (lo if g > 1 else 0) + (hi if g > 2 else 0)
        for b, g, (lo, hi) in zip(block, spec.grid, widths, strict=True)
    )
    return spec.batch * channels * (grown - math.prod(block)) * e


def _block(sim: Simulator, spec: StepSpec, x: int, cin: int, cout: int, lvl: int, vox: list[int],
           e: int, *, owned: bool = False) -> int:  # fmt: skip
    """(conv, norm, ReLU in place) x convs_per_level; returns the block's output. The
    block's input stays referenced by the caller until the block returns, unless ``owned``
    (a temporary handed to the block, let go after its first layer)."""
    size = spec.batch * cout * vox[lvl] * e
    k = 3**spec.spatial_dims
    bias = cout if spec.norm == "none" else 0
    region = len(sim.ops) if spec.checkpoint else None
    if region is not None:  # the checkpoint saves the block's input (through the hooks)
        sim.op([x], 0, [x])
    with sim.in_region(region):
        a = x
        for i in range(spec.convs_per_level):
            halo = _halo_bytes(spec, cin if i == 0 else cout, lvl, e)
            sim.halo = max(sim.halo, halo)
            c_in = cin if i == 0 else cout
            conv = sim.op([a], size, [a], extra=halo, params=c_in * cout * k + bias)
            if i > 0 or owned:
                sim.release(a)
            a = conv
            if spec.norm != "none":
                a = sim.op([conv], size, [conv], params=2 * cout)
                sim.release(conv)
            sim.op([a], 0, [a], inplace=True)  # ReLU saves its result
    return a


def unet_forward(sim: Simulator, spec: StepSpec, image: int, vox: list[int], e: int) -> int:
    """The U-Net's forward on ``image`` (``vox`` voxels per level, ``e`` bytes per element);
    returns the logits."""
    ch, n = spec.channels, spec.batch
    x, cin, skips = image, spec.in_channels, []
    for lvl in range(spec.depth):
        sim.skip_level = True
        y = _block(sim, spec, x, cin, ch[lvl], lvl, vox, e)
        if x != image:
            sim.release(x)
        skips.append(y)
        # Max-pool: saves its input and int64 indices of its output's size.
        out = n * ch[lvl] * vox[lvl + 1]
        x = sim.op([y], out * e, [y], extra=out * 8)
        sim.skip_level = False
        cin = ch[lvl]
    y = _block(sim, spec, x, cin, ch[-1], spec.depth, vox, e)
    sim.release(x)
    x, skip = y, None
    for lvl in range(spec.depth - 1, -1, -1):
        if spec.upsampling == "transposed":
            up = sim.op([x], n * ch[lvl] * vox[lvl] * e, [x],
                        params=ch[lvl + 1] * ch[lvl] * 2**spec.spatial_dims + ch[lvl])  # fmt: skip
        else:  # Upsample (saves nothing) then a 1x1 conv (saves the upsampled tensor)
            big = sim.op([x], n * ch[lvl + 1] * vox[lvl] * e)
            up = sim.op([big], n * ch[lvl] * vox[lvl] * e, [big],
                        params=ch[lvl + 1] * ch[lvl] + ch[lvl])  # fmt: skip
            sim.release(big)
        sim.release(x)
        if skip is not None:
            sim.release(skip)
        skip = skips.pop()
        cat = sim.op([skip, up], 2 * n * ch[lvl] * vox[lvl] * e, cat=True)
        x = _block(sim, spec, cat, 2 * ch[lvl], ch[lvl], lvl, vox, e, owned=True)
        sim.release(up)
    logits = sim.op([x], n * spec.classes * vox[0] * e, [x],
                    params=ch[0] * spec.classes + spec.classes)  # fmt: skip
    sim.release(x)
    sim.release(skip)
    return logits


def loss_forward(sim: Simulator, spec: StepSpec, logits: int, v: int) -> dict[int, int]:
    """The trainer's cross-entropy + Dice forward; returns the gradient of the logits once
    the losses' backward has run (the loss's saved tensors are freed by then)."""
    n, k = spec.batch, spec.classes
    plane = n * k * v * 4
    if spec.loss == "ce":  # log-softmax kept; the labels are the batch's own
        kept = sim.new(plane, grad=False)
        sim.release(logits)
        g = sim.new(plane)
        sim.spike(plane)
        sim.drop(kept)
        return {logits: g}
    # Kept for backward: log-softmax, softmax, masked probabilities and masked one-hot
    # (fp32), and the int64 labels with padding marked; the int64 one-hot and a second
    # masked copy of the labels come and go.
    kept = sim.new(4 * plane + n * v * 8, grad=False)
    sim.spike(2 * plane + 3 * plane + n * v * 8)
    sim.release(logits)  # nobody saved the logits
    g = sim.new(plane)
    sim.spike(2 * plane)
    sim.drop(kept)
    return {logits: g}
