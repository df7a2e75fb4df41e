"""Pointwise chains fused into the node before them.

An activation right after a convolution or a normalisation costs, layer by layer, a whole
extra pass: every block read back from the store, activated and written again. When a
pointwise step directly follows the step it reads, reads nothing else, and is that step's
only reader, it is applied to each block on the device before the block is stored; the
node before it then needs no store of its own.
"""

from __future__ import annotations

from collections import Counter

from haloseg.layerwise.graph import Step

__all__ = ["pointwise_chains"]

_COMPUTED = ("pointwise", "local", "norm")


def pointwise_chains(steps: list[Step]) -> dict[int, list[Step]]:
    """Per index of a computed step: the pointwise steps fused into it, in order.

    Readers are counted from ``step.images`` (after ``functionalise``, the values a step
    really reads) and the output's arguments."""
    readers: Counter = Counter()
    for s in steps:
        readers.update(s.node.all_input_nodes if s.kind == "output" and not s.images
                       else s.images)  # fmt: skip

    def follows(prev: Step, step: Step) -> bool:
        return (step.kind == "pointwise" and step.images == [prev.node]
                and readers[prev.node] == 1 and step.shape == prev.shape)  # fmt: skip

    chains: dict[int, list[Step]] = {}
    i = 0
    while i < len(steps):
        head, j = steps[i], i + 1
        if head.kind in _COMPUTED:
            while j < len(steps) and follows(steps[j - 1], steps[j]):
                j += 1
        if j > i + 1:
            chains[i] = steps[i + 1 : j]
        i = j
    return chains
