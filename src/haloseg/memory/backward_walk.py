"""The backward of a recorded step: ops in reverse, each allocating its inputs' gradients and
freeing what autograd frees (a saved tensor after its last use, a gradient once consumed,
the concatenation's gradient when both halves are used). Swapped tensors come back ahead of
their use (``prefetch`` ops early); a checkpointed region is replayed before its backward.
"""

from __future__ import annotations

import math

from haloseg.memory.simulator import Op, Simulator
from haloseg.memory.step_spec import StepSpec

__all__ = ["backward"]


def backward(sim: Simulator, spec: StepSpec, grads: dict[int, int]) -> None:
    """The backward of every op on ``sim``'s tape, last first; ``grads`` maps tensors to
    their gradients (the logits' to begin with)."""
    ops, i = sim.ops, len(sim.ops) - 1
    while i >= 0:
        region = ops[i].region
        if region is None:
            _prefetch(sim, ops, i, spec.prefetch)
            _op_backward(sim, ops[i], grads)
            i -= 1
            continue
        start = i
        while start > 0 and ops[start - 1].region == region:
            start -= 1
        _recompute(sim, ops[start : i + 1])
        for j in range(i, start - 1, -1):
            _op_backward(sim, ops[j], grads)
        i = start - 1


def _recompute(sim: Simulator, region: list[Op]) -> None:
    """Replay a checkpointed block's forward, saving this time: its tensors are new ones."""
    first = next(k for k, (_, o) in enumerate(sim.events) if o is region[0])
    last = next(k for k, (_, o) in enumerate(sim.events) if o is region[-1])
    fresh: dict[int, int] = {}
    for kind, item in sim.events[first : last + 1]:
        if kind == "drop":
            if item in fresh:  # the replay does not take the caller's references again
                sim.drop(fresh[item])
            continue
        if not item.inplace:
            fresh[item.out] = sim.new(sim.tensors[item.out].nbytes, grad=sim.tensors[item.out].grad)
        # Halo slabs come from the tape, as they are: nothing new is allocated for them.
        for s in dict.fromkeys(item.saves):
            t = sim.tensors[fresh.get(s, s)]
            if t.on_host:  # the block's input, swapped: its device copy serves the region
                sim.to_device(fresh.get(s, s))
                t.host_refs += 1
            else:
                t.refs += 1
            item.saved.append(fresh.get(s, s))
    sim.drop(fresh[region[-1].out])  # the recomputed output itself is not used


def _op_backward(sim: Simulator, op: Op, grads: dict[int, int]) -> None:
    g = grads.pop(op.out, None)
    if g is not None and op.params:
        # The layer's parameter gradients, kept to the optimizer step; under a spatial grid
        # autograd keeps zeros while the hooks hold the local gradient for the final sum.
        spec = sim.spec
        copies = 2 if spec.grid is not None and math.prod(spec.grid) > 1 else 1
        sim.new(copies * op.params * spec.param_bytes, grad=False)
    if g is not None:
        if op.cat:  # each input's gradient is a view of the output's gradient
            for i in op.inputs:
                sim.tensors[g].refs += 1
                _accumulate(sim, grads, i, g)
            sim.drop(g)
        else:
            for i in dict.fromkeys(op.inputs):
                if sim.tensors[i].grad:
                    _accumulate(sim, grads, i, sim.new(sim.tensors[i].nbytes))
            sim.drop(g)
    sim.unsave(op)


def _accumulate(sim: Simulator, grads: dict[int, int], i: int, g: int) -> None:
    if i in grads:  # autograd adds into the new gradient (it owns it) and frees the old one
        sim.drop(grads[i])
    grads[i] = g


def _prefetch(sim: Simulator, ops: list[Op], j: int, depth: int) -> None:
    """Host tensors of op ``j`` come back to the device, and the next ``depth`` distinct host
    tensors saved before them (backward asks in roughly reverse order of saving)."""
    seen = set(ops[j].saved)
    for s in ops[j].saved:
        sim.to_device(s)
    found = 0
    for k in range(j - 1, -1, -1):
        for s in reversed(ops[k].saved):
            if found >= depth:
                return
            if s in seen or not sim.tensors[s].on_host:
                continue
            seen.add(s)
            found += 1
            sim.to_device(s)
