"""Backward over blocks: the forward's nodes in reverse, one block at a time.

After a training forward (``keep``: every node's whole output still in the store), each
computed node (a layer with the activations fused into it) is differentiated block by
block: its input window is read again, the block recomputed under autograd, and the
gradient of the block's output, read from the node's gradient store, pulled back. The
window's gradient is added into the input node's gradient store, so the halo's share lands
on the neighbouring blocks' voxels (a mirrored or replicated border on the voxels it
showed); parameter gradients are summed over the blocks. Normalisation with whole-image
statistics takes two sweeps: the first pulls the gradient back to the block and to the
statistics (mean and variance), the second adds the statistics' share to every voxel.

Stores are freed as soon as nothing needs them: a node's output after the backward of its
first reader, a gradient after its node's backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import Box
from haloseg.layerwise.norm import Moments, normalise, statistics_gradient
from haloseg.layerwise.window import add_window, blocks_of, own_box, read_block

if TYPE_CHECKING:
    from haloseg.layerwise.executor import _Run
    from haloseg.layerwise.graph import Step

__all__ = ["backward", "check_trainable"]

_COMPUTED = ("pointwise", "local", "norm")


def check_trainable(steps: Sequence[Step]) -> None:
    """Refuse, naming it, a layer whose blocks recomputed in backward would differ from the
    forward's: dropout in training mode draws a new mask each time."""
    for s in steps:
        m = s.module
        if isinstance(m, (nn.Dropout, nn.AlphaDropout)) and m.training and m.p > 0:
            raise UnsupportedLayerError(
                f"'{s.node.target}': dropout in training mode draws a new mask when backward "
                "recomputes a block; layer-wise training needs p=0 (or this layer in eval mode)"
            )
        if s.node.op == "call_function" and "dropout" in getattr(s.node.target, "__name__", ""):
            if s.node.kwargs.get("training", True) and s.node.kwargs.get("p", 0.5) > 0:
                raise UnsupportedLayerError(
                    f"{s.node.name}: functional dropout draws a new mask when backward "
                    "recomputes a block; layer-wise training needs p=0 or training=False"
                )


def _grad_name(name: str) -> str:
    return "grad-" + name  # '-' is never in an fx node name


class _Backward:
    def __init__(self, run: _Run) -> None:
        self.run, self.store, self.device = run, run.store, run.device
        self.grads: Gradients = {}
        self.leaves: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(const computed from parameters, the leaf standing for it in the blocks)."""

    # -- gradient stores -------------------------------------------------------------------
    def _grad_store(self, node: fx.Node) -> str:
        run = self.run
        gname = _grad_name(run.names[node])
        if gname not in run.held:
            shape, dtype = run.shape(node), run.dtype(node)
            chunks = (*shape[:2], *run.node_block(run.by_node[node]))
            self.store.zeros(gname, shape, dtype, chunks)
            run.hold(gname, _nbytes(shape, dtype))
        return gname

    def _needs(self, node: fx.Node) -> bool:
        """Whether ``node``'s gradient is wanted (the image's only when asked for)."""
        run = self.run
        return node in run.names and (node is not run.steps[0].node or run.input_grad)

    def _add(self, node: fx.Node, box: Box, grad: torch.Tensor | None) -> None:
        if grad is not None and self._needs(node):
            self.store.add(self._grad_store(node), box, grad)

    def _accumulate(self, weights: Sequence[torch.Tensor],
                    grads: Iterable[torch.Tensor | None]) -> None:  # fmt: skip
        for w, g in zip(weights, grads, strict=True):
            if g is None:
                continue
            if id(w) in self.grads:
                self.grads[id(w)][1].add_(g)
            else:
                self.grads[id(w)] = (w, g.clone())

    # -- constants computed from parameters (a weight standardisation) ---------------------
    def _leafify_constants(self) -> None:
        """Recompute the constants with autograd; those that depend on parameters are
        replaced, for the blocks, by leaves whose gradients are pulled back at the end."""
        from haloseg.layerwise.executor import call  # the executor imports this module

        run = self.run
        graph_values: dict[fx.Node, object] = {}
        with torch.enable_grad():
            for s in run.steps:
                if s.kind != "const":
                    continue
                node = s.node
                if node.op == "get_attr":
                    graph_values[node] = s.value
                    continue
                args, kwargs = fx.map_arg(
                    (node.args, node.kwargs),
                    lambda a: graph_values[a] if a in graph_values else run.value(a),
                )
                v = call(s, args, kwargs)
                graph_values[node] = v
                if isinstance(v, torch.Tensor) and v.requires_grad and not v.is_leaf:
                    leaf = v.detach().requires_grad_()
                    run.values[node] = leaf
                    self.leaves.append((v, leaf))

    def _pull_back_constants(self) -> None:
        done = [(v, self.grads.pop(id(leaf))[1]) for v, leaf in self.leaves
                if id(leaf) in self.grads]  # fmt: skip
        if not done:
            return
        weights = [p for p in self._all_weights() if p.requires_grad]
        grads = torch.autograd.grad([v for v, _ in done], weights, [g for _, g in done],
                                    allow_unused=True)  # fmt: skip
        self._accumulate(weights, grads)

    def _all_weights(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for s in self.run.steps:
            if s.module is not None:
                for p in s.module.parameters():
                    seen.setdefault(id(p), p)
            if s.kind == "const" and isinstance(s.value, nn.Parameter):
                seen.setdefault(id(s.value), s.value)
        return list(seen.values())

    def _weights(self, step: Step) -> list[torch.Tensor]:
        """The tensors requiring gradients that ``step`` and its fused chain read besides
        the image: the layers' parameters and constant arguments."""
        run, seen = self.run, {}
        for s in (step, *run.fused.get(step.node, ())):
            tensors = list(s.module.parameters()) if s.module is not None else []
            for a in s.node.all_input_nodes:
                v = run.values.get(a)
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
            for t in tensors:
                if t.requires_grad:
                    seen.setdefault(id(t), t)
        return list(seen.values())

    # -- the sweep -------------------------------------------------------------------------
    def run_backward(self, grad_outputs: Sequence[tuple[fx.Node, torch.Tensor]]) -> None:
        run = self.run
        self._leafify_constants()
        units = [s for s in run.steps if s.kind in _COMPUTED and s.node not in run.followers]
        first_reader: dict[str, int] = {}
        for i, s in enumerate(units):
            for a in s.images:
                if a in run.names:
                    first_reader.setdefault(run.names[a], i)
        for name in list(run.held):
            if name not in first_reader:
                run.release(name)  # the output, read by no layer
        for node, grad in grad_outputs:
            if grad is not None and node in run.names:
                g = grad.detach().to("cpu", run.dtype(node))
                self.store.add(self._grad_store(node), tuple((0, n) for n in g.shape[2:]), g)
        for i in range(len(units) - 1, -1, -1):
            step = units[i]
            gname = _grad_name(run.names[step.node])
            if gname in run.held:
                self._unit(step, gname)
                run.release(gname)
            for name, at in first_reader.items():
                if at == i and name in run.held:
                    run.release(name)
        self._pull_back_constants()

    def _unit(self, step: Step, gname: str) -> None:
        run = self.run
        boxes = blocks_of(step.shape[2:], run.node_block(step))
        weights = self._weights(step)
        last = run.fused.get(step.node, [step])[-1]
        if not (last.dtype is not None and last.dtype.is_floating_point):
            return
        if step.kind == "norm":
            self._norm(step, boxes, gname, weights)
            return
        for box in boxes:
            g = read_block(self.store, gname, last.shape, box, self.device, last.dtype)
            if step.kind == "local":
                self._local(step, box, g, weights)
            else:
                self._pointwise(step, box, g, weights)

    def _pull(self, y: torch.Tensor, g: torch.Tensor, inputs: list[torch.Tensor],
              weights: list[torch.Tensor]) -> list[torch.Tensor | None]:  # fmt: skip
        wanted = [t for t in inputs if t.requires_grad]
        if not y.requires_grad:
            return [None] * len(inputs)
        grads = torch.autograd.grad(y, [*wanted, *weights], g, allow_unused=True)
        self._accumulate(weights, grads[len(wanted) :])
        found = iter(grads[: len(wanted)])
        return [next(found) if t.requires_grad else None for t in inputs]

    def _local(self, step: Step, box: Box, g: torch.Tensor, weights: list[torch.Tensor]) -> None:
        run, source = self.run, step.images[0]
        x, window = run.read_window(step, box)
        with torch.enable_grad():
            x.requires_grad_(self._needs(source) and x.is_floating_point())
            y = run.chain(step, run.local(step, x, box, window))
            (gx,) = self._pull(y, g, [x], weights)
        if gx is not None and self._needs(source):
            add_window(self.store, self._grad_store(source), run.shape(source), window,
                       step.geometry.fill, gx)  # type: ignore[union-attr]  # fmt: skip

    def _pointwise(self, step: Step, box: Box, g: torch.Tensor,
                   weights: list[torch.Tensor]) -> None:  # fmt: skip
        run = self.run
        blocks = {a: run.read(a, box) for a in step.images}
        for a, b in blocks.items():
            b.requires_grad_(b.is_floating_point() and self._needs(a))
        with torch.enable_grad():
            given = dict(blocks)
            if step.inplace and step.images:  # it writes into its first input's block
                given[step.images[0]] = blocks[step.images[0]].clone()
            y = run.chain(step, run.apply(step, given))
            grads = self._pull(y, g, list(blocks.values()), weights)
        for a, ga in zip(blocks, grads, strict=True):
            self._add(a, own_box(run.shape(a), box), ga)

    def _norm(self, step: Step, boxes: list[Box], gname: str,
              weights: list[torch.Tensor]) -> None:  # fmt: skip
        run, source, m = self.run, step.images[0], step.module
        assert m is not None
        mom = run.moments[step.node]
        mom = Moments(mom.count, mom.mean.to(self.device), mom.m2.to(self.device))
        last = run.fused.get(step.node, [step])[-1]
        d_mean = torch.zeros_like(mom.mean)
        d_var = torch.zeros_like(mom.mean)
        for box in boxes:
            g = read_block(self.store, gname, last.shape, box, self.device, last.dtype)
            x = run.read(source, box).requires_grad_(self._needs(source))
            mean = mom.mean.clone().requires_grad_()
            var = mom.var.clone().requires_grad_()
            with torch.enable_grad():
                y = run.chain(step, normalise(m, x, mean, var))
                gx, gm, gv = self._pull(y, g, [x, mean, var], weights)
            self._add(source, box, gx)
            d_mean += gm if gm is not None else 0.0
            d_var += gv if gv is not None else 0.0
        for box in boxes:
            x = run.read(source, box)
            self._add(source, box, statistics_gradient(m, x, mom, d_mean, d_var))


Gradients = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""Per parameter, by id: the parameter and its gradient."""


def backward(run: _Run, grad_outputs: Sequence[tuple[fx.Node, torch.Tensor]]
             ) -> tuple[torch.Tensor | None, Gradients]:  # fmt: skip
    """Differentiate the kept forward ``run`` for the gradients of its output nodes: the
    input image's gradient (None if it needs none) and, per parameter (by id), the
    parameter and its gradient."""
    b = _Backward(run)
    b.run_backward(grad_outputs)
    image = run.steps[0].node
    gname = _grad_name(run.names[image])
    grad = run.store.whole(gname) if gname in run.held else None
    return grad, b.grads


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
