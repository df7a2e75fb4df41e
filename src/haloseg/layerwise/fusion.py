"""Pointwise chains fused into the node before them.

An activation right after a convolution or a normalisation costs, layer by layer, a whole
extra pass: every block read back from the store, activated and written again. When a
pointwise step directly follows the step it reads, reads nothing else, and is that step's
only reader, it is applied to each block on the device before the block is stored; the
node before it then needs no store of its own.
"""

from __future__ import annotations

from haloseg.layerwise.graph import Step

__all__ = ["pointwise_chains"]

_COMPUTED = ("pointwise", "local", "norm")


def _follows(prev: Step, step: Step) -> bool:
    return (step.kind == "pointwise" and step.images == [prev.node]
            and len(prev.node.users) == 1 and step.shape == prev.shape)  # fmt: skip


def pointwise_chains(steps: list[Step]) -> dict[int, list[Step]]:
    """Per index of a computed step: the pointwise steps fused into it, in order."""
    chains: dict[int, list[Step]] = {}
    i = 0
    while i < len(steps):
        head, j = steps[i], i + 1
        # An in-place step writing into its input's store: later readers of that store
        # must see its values, not its followers'.
        if head.kind in _COMPUTED and not (head.inplace and head.kind == "pointwise"):
            while j < len(steps) and _follows(steps[j - 1], steps[j]):
                j += 1
        if j > i + 1:
            chains[i] = steps[i + 1 : j]
        i = j
    return chains
