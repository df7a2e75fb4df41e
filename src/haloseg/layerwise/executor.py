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
from haloseg.layerwise.fusion import pointwise_chains
from haloseg.layerwise.graph import Step, plan_steps
from haloseg.layerwise.norm import Moments, block_moments, normalise_block, update_running
from haloseg.layerwise.store import Store, open_store
from haloseg.layerwise.window import blocks_of, read_block, read_window

__all__ = ["LayerwiseExecutor", "LayerwiseReport", "NodeCount", "run_layerwise"]

log = logging.getLogger(__name__)


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

    @torch.no_grad()
    def run(self, image: torch.Tensor) -> Any:
        """The model's output for ``image`` (N, C, *spatial), as plain ``model(image)`` gives
        it, on the CPU."""
        if not isinstance(image, torch.Tensor) or image.dim() < 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise DataError(f"image {got} must be a tensor (N, C, *spatial)")
        self.model.to(self.device)
        blocks = _block_tuple(self.block, image.dim() - 2)
        steps = plan_steps(self.model, image.shape, image.dtype)
        store = open_store(self.store_spec, pin=self.device.type == "cuda")
        self.report = LayerwiseReport()
        try:
            return _Run(steps, store, self.device, blocks, self.report).run(image)
        finally:
            store.close()


def run_layerwise(model: nn.Module, image: torch.Tensor, *, block: int | Sequence[int],
                  device: torch.device | str | None = None,
                  store: str | Path | Store = "memory") -> Any:  # fmt: skip
    """``model(image)`` computed exactly, one block of one layer at a time on ``device``,
    every layer's whole output held in ``store`` (host memory or a zarr folder)."""
    return LayerwiseExecutor(model, block=block, device=device, store=store).run(image)


class _Run:
    """One pass over the steps; holds the stores' names and the non-image values."""

    def __init__(self, steps: list[Step], store: Store, device: torch.device,
                 block: list[int], report: LayerwiseReport) -> None:  # fmt: skip
        self.steps, self.store, self.device, self.report = steps, store, device, report
        self.block = block
        self.by_node = {s.node: s for s in steps}
        self.values: dict[fx.Node, Any] = {}
        self.names: dict[fx.Node, str] = {}
        self.held: dict[str, int] = {}
        self.root: dict[fx.Node, fx.Node] = {}
        chains = pointwise_chains(steps)
        self.fused = {steps[i].node: chain for i, chain in chains.items()}
        self.followers = {f.node for chain in chains.values() for f in chain}

    def run(self, image: torch.Tensor) -> Any:
        last = self._last_reads()
        self.image_spatial = tuple(image.shape[2:])
        for i, step in enumerate(self.steps):
            node = step.node
            if step.kind == "input":
                self.names[node] = node.name
                self.store.put(node.name, image)
            elif step.kind == "const":
                self.values[node] = self._const(step)
            elif step.kind == "meta":
                self.values[node] = step.value
            elif step.kind == "output":
                return fx.map_arg(node.args[0], self._whole)
            elif node not in self.followers:
                self._compute(step)
            for name, at in last.items():
                if at == i and name in self.held:
                    self.store.free(name)
                    del self.held[name]
        raise DataError("the traced network has no output")

    def _whole(self, node: fx.Node) -> Any:
        if node not in self.names:
            return self.values[node]
        whole = self.store.whole(self.names[node])
        # The image itself (an identity network) is the caller's tensor: never hand it back.
        return whole.clone() if self.names[node] == self.steps[0].node.name else whole

    def _last_reads(self) -> dict[str, int]:
        """Per store: the index of the last step that reads it (the output: never freed)."""
        root = self.root
        for s in self.steps:
            if s.kind in ("input", "pointwise", "local", "norm"):
                root[s.node] = root[s.images[0]] if s.inplace else s.node
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            at = len(self.steps) if s.kind == "output" else i
            for a in s.node.all_input_nodes:
                if a in root:
                    name = root[a].name
                    last[name] = max(last.get(name, -1), at)
        return last

    def _value(self, node: fx.Node) -> Any:
        v = self.values[node]
        return v.to(self.device) if isinstance(v, torch.Tensor) else v

    def _const(self, step: Step) -> Any:
        node = step.node
        if node.op == "get_attr":
            return step.value
        args, kwargs = fx.map_arg((node.args, node.kwargs), self._value)
        return _call(step, args, kwargs)

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.by_node[node].shape

    def _dtype(self, node: fx.Node) -> torch.dtype:
        dtype = self.by_node[node].dtype
        assert dtype is not None
        return dtype

    def _compute(self, step: Step) -> None:
        node = step.node
        chain = self.fused.get(node, [])
        last = chain[-1] if chain else step
        if step.inplace and step.kind == "pointwise" and step.shape == self._shape(step.images[0]):
            self.names[node] = self.names[step.images[0]]
        else:
            # A fused chain's values are stored once, under the name its readers look for.
            name = self.root[last.node].name
            for s in (step, *chain):
                self.names[s.node] = name
            chunks = (*step.shape[:2], *self._node_block(step))
            self.store.create(name, last.shape, last.dtype, chunks)  # type: ignore[arg-type]
            self.held[name] = _bytes(last)
            total = sum(self.held.values())
            self.report.peak_store_bytes = max(self.report.peak_store_bytes, total)
        boxes = blocks_of(step.shape[2:], self._node_block(step))
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

    def _node_block(self, step: Step) -> list[int]:
        return kernels.step_block(step, self.block, self.image_spatial)

    def _read(self, node: fx.Node, box: Box) -> torch.Tensor:
        return read_block(self.store, self.names[node], self._shape(node), box, self.device,
                          self._dtype(node))  # fmt: skip

    def _write(self, step: Step, box: Box, y: torch.Tensor) -> None:
        for f in self.fused.get(step.node, ()):
            y = self._apply(f, {f.images[0]: y})
        want = tuple(b - a for a, b in box)
        if tuple(y.shape[2:]) != want or tuple(y.shape[:2]) != step.shape[:2]:
            raise DataError(
                f"{step.node.name}: a block came out {tuple(y.shape)} where "
                f"{(*step.shape[:2], *want)} was expected"
            )
        self.store.write(self.names[step.node], box, y)

    def _pointwise(self, step: Step, box: Box) -> int:
        self._write(step, box, self._apply(step, {a: self._read(a, box) for a in step.images}))
        return _volume(box)

    def _apply(self, step: Step, blocks: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """A pointwise ``step`` on the blocks of its image inputs."""
        node = step.node
        args, kwargs = fx.map_arg(
            (node.args, node.kwargs), lambda a: blocks[a] if a in blocks else self._value(a)
        )
        return _call(step, args, kwargs)

    def _local(self, step: Step, box: Box) -> int:
        source = step.images[0]
        window = kernels.window_of(step, box)
        x = read_window(self.store, self.names[source], self._shape(source), window,
                        step.geometry.fill, self.device, self._dtype(source))  # type: ignore[union-attr]  # fmt: skip
        node = step.node
        args, kwargs = fx.map_arg((node.args, node.kwargs),
                                  lambda a: x if a is source else self._value(a))  # fmt: skip
        self._write(step, box, kernels.local_block(step, x, box, window, args, kwargs))
        return kernels.computed_voxels(step, box, window)

    def _norm(self, step: Step, boxes: list[Box]) -> None:
        source, m = step.images[0], step.module
        assert m is not None
        moments: Moments | None = None
        for box in boxes:
            part = block_moments(m, self._read(source, box))
            moments = part if moments is None else moments.merge(part)
        assert moments is not None
        update_running(m, moments, step.shape[0])
        for box in boxes:
            self._write(step, box, normalise_block(m, self._read(source, box), moments))


def _call(step: Step, args: Any, kwargs: Any) -> Any:
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
