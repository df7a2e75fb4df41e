"""In-place operations as new values: every read names the value it sees.

``x += y`` or ``relu(x, inplace=True)`` changes the tensor ``x`` refers to: in eager
PyTorch, every later reader of ``x`` sees the changed values. Layer by layer, each node has
a store of its own; an in-place step writes a new store, and every step after it that reads
``x`` (or any tensor sharing its memory) is pointed at the in-place step instead. The
values before the change stay where backward needs them.
"""

from __future__ import annotations

from torch import fx

from haloseg.layerwise.graph import Step

__all__ = ["Reads", "functionalise"]

Reads = dict[fx.Node, dict[fx.Node, fx.Node]]
"""Per step's node: the node each of its image arguments names -> the node whose value it
reads."""

_IMAGES = ("pointwise", "local", "norm")


def functionalise(steps: list[Step]) -> Reads:
    """Point every image read of ``steps`` at the latest in-place write into its tensor;
    rewrites ``step.images`` and returns each step's mapping (also for the output step)."""
    shapes = {s.node: s.shape for s in steps if s.shape}
    group: dict[fx.Node, fx.Node] = {}
    latest: dict[fx.Node, fx.Node] = {}
    reads: Reads = {}
    for step in steps:
        node = step.node
        if step.kind == "input":
            group[node] = latest[node] = node
            continue
        if step.kind not in (*_IMAGES, "output"):
            continue
        args = [a for a in node.all_input_nodes if a in group]
        mapping = {a: latest[group[a]] for a in args}
        reads[node] = mapping
        if step.kind == "output":
            step.images = list(dict.fromkeys(mapping.values()))
            continue
        step.images = list(dict.fromkeys(mapping.get(a, a) for a in step.images))
        first = node.all_input_nodes[0] if node.all_input_nodes else None
        aliases = (step.inplace and step.kind == "pointwise" and first in group
                   and shapes.get(first) == step.shape)  # fmt: skip
        root = group[first] if aliases else node  # type: ignore[index]
        group[node] = root
        latest[root] = node
    return reads
