"""Exact whole-image execution on one device, one node and one block at a time.

Every node of the traced network (``haloseg.layerwise.graph``) keeps its whole output in a
store on the host (``haloseg.layerwise.store``); the compute device only ever holds the
input windows and the output of one block of one node. Skip connections are earlier nodes'
stores; a store is freed after its last reader. Local layers read their window by the
registry's rules, pointwise operations (activations, concatenation, additions) the block
itself, and normalisation with whole-image statistics takes a statistics sweep over its
input's blocks before it normalises them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from haloseg.errors import ConfigError, DataError
from haloseg.geometry import Box
from haloseg.layerwise import kernels
from haloseg.layerwise.alias import functionalise
from haloseg.layerwise.backward import backward, check_trainable
from haloseg.layerwise.fusion import pointwise_chains
from haloseg.layerwise.graph import Step, plan_steps
from haloseg.layerwise.norm import Moments, block_moments, normalise_block, update_running
from haloseg.layerwise.store import Store, open_store
from haloseg.layerwise.window import blocks_of, read_block, read_window

__all__ = ["LayerwiseExecutor", "LayerwiseReport", "NodeCount", "run_layerwise"]

log = logging.getLogger(__name__)

_COMPUTED = ("pointwise", "local", "norm")


@dataclass(frozen=True)
class NodeCount:
    """Output voxels (spatial, per sample and channel) of one node: whole-image and computed."""

    name: str
    kind: str
    plain: int
    computed: int
    blocks: int


@dataclass
class LayerwiseReport:
    """What one layer-wise run computed and held."""

    nodes: list[NodeCount] = field(default_factory=list)
    peak_store_bytes: int = 0
    """Largest total size of the node outputs held in the store at once."""

    @property
    def redundancy(self) -> float:
        """Computed output voxels over a plain whole-image run's, over all nodes."""
        return sum(c.computed for c in self.nodes) / max(1, sum(c.plain for c in self.nodes))


def _block_tuple(block: int | Sequence[int], n: int) -> list[int]:
    sizes = [block] * n if isinstance(block, int) else list(block)
    if len(sizes) != n or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                               for b in sizes):  # fmt: skip
        raise ConfigError(
            f"block={block!r} must be one integer >= 1 or {n} of them (one per spatial dim)"
        )
    return sizes


def _volume(box: Box) -> int:
    v = 1
    for a, b in box:
        v *= b - a
    return v


class LayerwiseExecutor:
    """Runs ``model`` over whole images node by node, ``block`` voxels at a time.

    ``block``: voxels per spatial dim of a block at the image's resolution (one int for all);
    deeper nodes use the same region at their own resolution. ``device``: where blocks are
    computed (default: the model's; the model is moved there). ``store``: ``"memory"`` (host
    tensors) or a folder for zarr arrays. After ``run``, ``report`` holds the voxel counts.
    """

    def __init__(self, model: nn.Module, *, block: int | Sequence[int],
                 device: torch.device | str | None = None,
                 store: str | Path | Store = "memory") -> None:  # fmt: skip
        self.model = model
        self.block = block
        first = next(model.parameters(), None)
        default = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device) if device is not None else default
        self.store_spec = store
        self.report = LayerwiseReport()
        self._pending: _Run | None = None

    @torch.no_grad()
    def run(self, image: torch.Tensor) -> Any:
        """The model's output for ``image`` (N, C, *spatial), as plain ``model(image)`` gives
        it, on the CPU."""
        run = self._start(image, keep=False)
        try:
            return run.run(image)
        finally:
            run.store.close()

    @torch.no_grad()
    def forward(self, image: torch.Tensor, *, input_grad: bool = False) -> Any:
        """A training forward: ``run``'s output, with every layer's output kept in the store
        for ``backward`` (and running statistics updated once, as the model's own forward
        does). ``input_grad``: ``backward`` also returns the image's gradient."""
        self.release()
        run = self._start(image, keep=True)
        run.input_grad = input_grad
        check_trainable(run.steps)
        try:
            out = run.run(image)
        except BaseException:
            run.store.close()
            raise
        self._pending = run
        return out

    def gradients(self, grad_output: Any) -> tuple[torch.Tensor | None, dict]:
        """Gradients of the last ``forward`` for ``grad_output`` (shaped as its output, None
        where no gradient flows): the image's gradient (or None) and, per parameter by id,
        ``(parameter, gradient)``. The kept stores are freed."""
        run = self._pending
        if run is None:
            raise DataError("backward needs a forward first: call forward(image), then backward")
        self._pending = None
        try:
            out = run.steps[-1]
            nodes = torch.utils._pytree.tree_leaves(
                fx.map_arg(out.node.args[0], lambda a: run.eff(out, a))
            )
            grads = torch.utils._pytree.tree_leaves(grad_output, is_leaf=lambda t: t is None)
            if len(grads) != len(nodes):
                raise DataError(
                    f"backward got {len(grads)} gradients for the {len(nodes)} outputs of "
                    "the forward; give one per output (None where none flows)"
                )
            return backward(run, list(zip(nodes, grads, strict=True)))
        finally:
            run.store.close()

    def backward(self, grad_output: Any) -> torch.Tensor | None:
        """As ``tensor.backward`` after plain ``model(image)``: adds the parameters'
        gradients into their ``.grad``; returns the image's gradient (``input_grad``)."""
        grad, params = self.gradients(grad_output)
        for p, g in params.values():
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g
        return grad

    def release(self) -> None:
        """Drop what a training forward kept for a backward that will not come."""
        run, self._pending = getattr(self, "_pending", None), None
        if run is not None:
            run.store.close()

    def _start(self, image: torch.Tensor, *, keep: bool) -> _Run:
        if not isinstance(image, torch.Tensor) or image.dim() < 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise DataError(f"image {got} must be a tensor (N, C, *spatial)")
        self.model.to(self.device)
        blocks = _block_tuple(self.block, image.dim() - 2)
        steps = plan_steps(self.model, image.shape, image.dtype)
        store = open_store(self.store_spec, pin=self.device.type == "cuda")
        self.report = LayerwiseReport()
        return _Run(steps, store, self.device, blocks, self.report, keep=keep)


def run_layerwise(model: nn.Module, image: torch.Tensor, *, block: int | Sequence[int],
                  device: torch.device | str | None = None,
                  store: str | Path | Store = "memory") -> Any:  # fmt: skip
    """``model(image)`` computed exactly, one block of one layer at a time on ``device``,
    every layer's whole output held in ``store`` (host memory or a zarr folder)."""
    return LayerwiseExecutor(model, block=block, device=device, store=store).run(image)


class _Run:
    """One pass over the steps; holds the stores' names and the non-image values.

    ``keep``: hold every store after the forward (training: backward reads them again)."""

    def __init__(self, steps: list[Step], store: Store, device: torch.device, block: list[int],
                 report: LayerwiseReport, keep: bool = False) -> None:  # fmt: skip
        self.steps, self.store, self.device, self.report = steps, store, device, report
        self.block, self.keep = block, keep
        self.input_grad = False
        self.reads = functionalise(steps)
        self.by_node = {s.node: s for s in steps}
        self.values: dict[fx.Node, Any] = {}
        self.held: dict[str, int] = {}
        self.moments: dict[fx.Node, Moments] = {}
        chains = pointwise_chains(steps)
        self.fused = {steps[i].node: chain for i, chain in chains.items()}
        self.followers = {f.node for chain in chains.values() for f in chain}
        # A fused chain's values are stored once, under the name of its last node.
        self.names: dict[fx.Node, str] = {}
        for s in steps:
            if s.kind in ("input", *_COMPUTED) and s.node not in self.followers:
                last = self.fused.get(s.node, [s])[-1]
                for t in (s, *self.fused.get(s.node, ())):
                    self.names[t.node] = last.node.name

    def run(self, image: torch.Tensor) -> Any:
        last = self._last_reads()
        self.image_spatial = tuple(image.shape[2:])
        for i, step in enumerate(self.steps):
            node = step.node
            if step.kind == "input":
                self.store.put(node.name, image)
                self.hold(node.name, 0)  # the caller's tensor (a copy only on disk)
            elif step.kind == "const":
                self.values[node] = self._const(step)
            elif step.kind == "meta":
                self.values[node] = step.value
            elif step.kind == "output":
                return fx.map_arg(node.args[0], lambda a, s=step: self._whole(self.eff(s, a)))
            elif node not in self.followers:
                self._compute(step)
            if self.keep:
                continue
            for name, at in last.items():
                if at == i and name in self.held:
                    self.release(name)
        raise DataError("the traced network has no output")

    def eff(self, step: Step, node: fx.Node) -> fx.Node:
        """The node whose value ``step`` reads where its arguments name ``node``."""
        return self.reads.get(step.node, {}).get(node, node)

    def release(self, name: str) -> None:
        self.store.free(name)
        del self.held[name]

    def hold(self, name: str, nbytes: int) -> None:
        self.held[name] = nbytes
        total = sum(self.held.values())
        self.report.peak_store_bytes = max(self.report.peak_store_bytes, total)

    def _whole(self, node: fx.Node) -> Any:
        if node not in self.names:
            return self.values[node]
        whole = self.store.whole(self.names[node])
        # The image itself (an identity network) is the caller's tensor: never hand it back.
        return whole.clone() if self.names[node] == self.steps[0].node.name else whole

    def _last_reads(self) -> dict[str, int]:
        """Per store: the index of the last step that reads it (the output: never freed)."""
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            at = len(self.steps) if s.kind == "output" else i
            for a in s.images:
                if a in self.names:
                    last[self.names[a]] = max(last.get(self.names[a], -1), at)
        return last

    def value(self, node: fx.Node) -> Any:
        """A non-image argument on the compute device."""
        v = self.values[node]
        return v.to(self.device) if isinstance(v, torch.Tensor) else v

    def _const(self, step: Step) -> Any:
        node = step.node
        if node.op == "get_attr":
            return step.value
        args, kwargs = fx.map_arg((node.args, node.kwargs), self.value)
        return call(step, args, kwargs)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.by_node[node].shape

    def dtype(self, node: fx.Node) -> torch.dtype:
        dtype = self.by_node[node].dtype
        assert dtype is not None
        return dtype

    def _compute(self, step: Step) -> None:
        node = step.node
        chain = self.fused.get(node, [])
        last = chain[-1] if chain else step
        name = self.names[node]
        chunks = (*step.shape[:2], *self.node_block(step))
        self.store.create(name, last.shape, last.dtype, chunks)  # type: ignore[arg-type]
        self.hold(name, _bytes(last))
        boxes = blocks_of(step.shape[2:], self.node_block(step))
        if step.kind == "norm":
            self._norm(step, boxes)
            computed = sum(_volume(b) for b in boxes)
        elif step.kind == "local":
            kernels.check_local(step)
            computed = sum(self._local(step, box) for box in boxes)
        else:
            computed = sum(self._pointwise(step, box) for box in boxes)
        plain = _volume(tuple((0, s) for s in step.shape[2:]))
        self.report.nodes.append(NodeCount(node.name, step.kind, plain, computed, len(boxes)))
        for f in chain:
            self.report.nodes.append(NodeCount(f.node.name, f.kind, plain, plain, len(boxes)))
        log.debug("%s: %s over %d blocks", node.name, step.kind, len(boxes))

    def node_block(self, step: Step) -> list[int]:
        return kernels.step_block(step, self.block, self.image_spatial)

    def read(self, node: fx.Node, box: Box) -> torch.Tensor:
        return read_block(self.store, self.names[node], self.shape(node), box, self.device,
                          self.dtype(node))  # fmt: skip

    def read_window(self, step: Step, box: Box) -> tuple[torch.Tensor, Box]:
        """The input window of the local ``step`` for its output block ``box``."""
        source = step.images[0]
        window = kernels.window_of(step, box)
        x = read_window(self.store, self.names[source], self.shape(source), window,
                        step.geometry.fill, self.device, self.dtype(source))  # type: ignore[union-attr]  # fmt: skip
        return x, window

    def _write(self, step: Step, box: Box, y: torch.Tensor) -> None:
        y = self.chain(step, y)
        want = tuple(b - a for a, b in box)
        if tuple(y.shape[2:]) != want or tuple(y.shape[:2]) != step.shape[:2]:
            raise DataError(
                f"{step.node.name}: a block came out {tuple(y.shape)} where "
                f"{(*step.shape[:2], *want)} was expected"
            )
        self.store.write(self.names[step.node], box, y)

    def chain(self, step: Step, y: torch.Tensor) -> torch.Tensor:
        """The pointwise steps fused into ``step``, applied to its block ``y``."""
        for f in self.fused.get(step.node, ()):
            if f.inplace and y.requires_grad and y.is_leaf:
                y = y.clone()  # an in-place activation on a window autograd differentiates
            y = self.apply(f, {f.images[0]: y})
        return y

    def _pointwise(self, step: Step, box: Box) -> int:
        self._write(step, box, self.apply(step, {a: self.read(a, box) for a in step.images}))
        return _volume(box)

    def apply(self, step: Step, blocks: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """A pointwise ``step`` on the blocks of the image values it reads."""
        node = step.node
        args, kwargs = fx.map_arg(
            (node.args, node.kwargs),
            lambda a: blocks[self.eff(step, a)] if self.eff(step, a) in blocks else self.value(a),
        )
        return call(step, args, kwargs)

    def local(self, step: Step, x: torch.Tensor, box: Box, window: Box) -> torch.Tensor:
        """The local ``step``'s output block ``box`` from its input window ``x``."""
        source = step.images[0]
        node = step.node
        args, kwargs = fx.map_arg(
            (node.args, node.kwargs), lambda a: x if self.eff(step, a) is source else self.value(a)
        )
        return kernels.local_block(step, x, box, window, args, kwargs)

    def _local(self, step: Step, box: Box) -> int:
        x, window = self.read_window(step, box)
        self._write(step, box, self.local(step, x, box, window))
        return kernels.computed_voxels(step, box, window)

    def _norm(self, step: Step, boxes: list[Box]) -> None:
        source, m = step.images[0], step.module
        assert m is not None
        moments: Moments | None = None
        for box in boxes:
            part = block_moments(m, self.read(source, box))
            moments = part if moments is None else moments.merge(part)
        assert moments is not None
        update_running(m, moments, step.shape[0])
        if self.keep:
            self.moments[step.node] = moments
        for box in boxes:
            self._write(step, box, normalise_block(m, self.read(source, box), moments))


def call(step: Step, args: Any, kwargs: Any) -> Any:
    """``step``'s layer or call on ``args``."""
    node = step.node
    if node.op == "call_module":
        assert step.module is not None
        return step.module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)  # type: ignore[operator]


def _bytes(step: Step) -> int:
    n = 1
    for s in step.shape:
        n *= s
    return n * torch.empty((), dtype=step.dtype).element_size()
