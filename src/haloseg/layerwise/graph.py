"""A network as a graph of whole-image nodes, and what each node means for blocks.

``torch.fx`` traces the module with every layer the registry knows (convolutions, norms,
pooling, up-sampling, activations) kept whole as one ``call_module`` node; containers and
unregistered modules with children are traced through. While tracing, every value also runs
on the meta device, so ``.shape``, ``.size()``, ``.dim()`` and ``.ndim`` answer with the
image's real sizes and Python control flow on shapes (MONAI's padding of odd-sized skips)
takes the branch it takes for that image: the graph is specific to one input shape. Each node
then becomes a ``Step``: the input, a layer or call computed block by block (``pointwise``,
``local`` with the registry's per-axis rules, ``norm`` with statistics over the whole image),
a value that depends on the image's shape only (``meta``), or a constant (``const``,
evaluated for real once).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from haloseg.errors import UnsupportedLayerError
from haloseg.geometry import AxisRule, Geometry, Unsupported, call_geometry, layer_entry
from haloseg.geometry.registry import layer_geometry

__all__ = ["Step", "plan_steps", "trace"]

# Methods and functions that move voxels between spatial positions while they may keep the
# shape (a transpose of a square image): never pointwise.
_MOVES = {"permute", "transpose", "view", "reshape", "flatten", "unflatten", "movedim",
          "moveaxis", "swapaxes", "swapdims", "t", "unfold", "as_strided", "narrow", "select",
          "squeeze", "unsqueeze", "expand", "repeat", "view_as", "reshape_as", "chunk",
          "split", "unbind", "tensor_split"}  # fmt: skip
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass
class Step:
    """One node of the traced network and how it is computed over blocks."""

    node: fx.Node
    kind: str
    """input, pointwise, local, norm, meta, const, output."""
    shape: tuple[int, ...] = ()
    """(N, C, *spatial) of an image node's output."""
    dtype: torch.dtype | None = None
    module: nn.Module | None = None
    geometry: Geometry | None = None
    rules: list[AxisRule] = field(default_factory=list)
    """Per-axis rules of a local step, for its first input's spatial size."""
    execution: str | None = None
    """The registry's execution name (conv, conv_transpose, pool, upsample, pad, *_norm)."""
    images: list[fx.Node] = field(default_factory=list)
    """The image nodes it reads."""
    inplace: bool = False
    """It writes into its first input (an in-place activation): the two share a store."""
    value: Any = None
    """A meta step's value."""


_UNKNOWN: Any = object()
"""The value of a proxy that did not run on the meta device: it stays symbolic."""


class _Unknown(Exception):
    """A node's argument has no meta value."""


class _ShapeProxy(fx.Proxy):
    """A proxy that knows its value on the meta device and answers shape queries with it."""

    tracer: _Tracer

    def _tensor(self) -> torch.Tensor | None:
        value = self.tracer.values.get(self.node, _UNKNOWN)
        return value if isinstance(value, torch.Tensor) else None

    @property
    def shape(self) -> Any:
        t = self._tensor()
        return t.shape if t is not None else fx.proxy.Attribute(self, "shape")

    @property
    def ndim(self) -> Any:
        t = self._tensor()
        return t.ndim if t is not None else fx.proxy.Attribute(self, "ndim")

    def size(self, *args: Any, **kwargs: Any) -> Any:
        t = self._tensor()
        return t.size(*args, **kwargs) if t is not None else self._call("size", args, kwargs)

    def dim(self) -> Any:
        t = self._tensor()
        return t.dim() if t is not None else self._call("dim", (), {})

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return self.tracer.create_proxy("call_method", method, (self, *args), kwargs)


class _Tracer(fx.Tracer):
    """Keeps registered layers whole and runs every new node on the meta device."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.n = len(shape) - 2
        self.image = torch.empty(tuple(shape), dtype=dtype, device="meta")
        self.values: dict[fx.Node, Any] = {}
        self.failure: str | None = None
        """Why the first node that did not run on the meta device failed."""
        self._evaluating = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        try:
            found = layer_entry(m)
        except Unsupported as e:
            raise UnsupportedLayerError(f"'{module_qualified_name}': {e}") from None
        if found is None:
            return next(m.children(), None) is None
        return found[1].geometry(m, self.n).kind != "composite"

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple,
        kwargs: dict,
        name: str | None = None,
        type_expr: Any = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            # The image, then any later input's default (left unknown without one).
            first = not any(n.op == "placeholder" for n in self.values)
            value = self.image if first else (args[0] if args else _UNKNOWN)
        else:
            value = self._evaluate(kind, target, args, kwargs)
        if value is not _UNKNOWN:
            self.values[proxy.node] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The node's value on the meta device, or ``_UNKNOWN`` where it does not run there
        (a data-dependent operation): the proxy stays symbolic, and the trace or the meta run
        of the finished graph refuses the model if that matters."""
        try:
            args, kwargs = fx.node.map_aggregate((args, kwargs), self._meta_arg)
            with self._untraced():
                if kind == "get_attr":
                    value = _fetch(self.root, str(target))
                    return _on_meta(value) if isinstance(value, torch.Tensor) else value
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    m = self.root.get_submodule(str(target))
                    return torch.func.functional_call(m, _meta_state(m), args, kwargs)
        except _Unknown:
            pass  # an argument is unknown: the failure was recorded where it arose
        except Exception as e:
            if self.failure is None:
                shape = tuple(self.image.shape)
                self.failure = f"{kind} '{target}' fails on shape {shape}: {_first_line(e)}"
        return _UNKNOWN

    def _meta_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            value = self.values.get(a.node, _UNKNOWN)
            if value is _UNKNOWN:
                raise _Unknown(a.node)
            return value
        return _on_meta(a) if isinstance(a, torch.Tensor) else a

    @contextmanager
    def _untraced(self) -> Iterator[None]:
        """Module calls and attributes behave as outside tracing (fx patches them while it
        traces): evaluating a node must not record nodes."""
        before, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = before

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple,
                    kwargs: dict) -> Any:  # fmt: skip
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


@contextmanager
def _proxies_are_tensors() -> Iterator[None]:
    """``torch.jit.isinstance`` (MONAI's test for an optional skip tensor) answers for a
    proxy's meta value, not for the proxy: otherwise tracing drops the branch."""
    original = torch.jit.isinstance

    def isinstance_(obj: Any, target_type: Any) -> bool:
        if isinstance(obj, _ShapeProxy) and (t := obj._tensor()) is not None:
            return original(t, target_type)
        return original(obj, target_type)

    torch.jit.isinstance = isinstance_
    try:
        yield
    finally:
        torch.jit.isinstance = original


def trace(model: nn.Module, shape: Sequence[int], dtype: torch.dtype) -> fx.GraphModule:
    """``model`` as an fx graph whose registered layers are ``call_module`` nodes, traced for
    an image of ``shape`` (N, C, *spatial) and ``dtype``: branches on shapes follow it."""
    tracer = _Tracer(shape, dtype)
    if layer_entry(model) is not None and tracer.is_leaf_module(model, ""):
        # A single registered layer: fx would trace its own forward, not keep it whole.
        model = nn.Sequential(model)
    try:
        with _proxies_are_tensors():
            graph = tracer.trace(model)
    except UnsupportedLayerError:
        raise
    except Exception as e:  # fx refuses data-dependent control flow with its own errors
        reason = _first_line(e)
        if tracer.failure is not None:  # the node left symbolic is the likelier cause
            reason += f"; earlier, {tracer.failure}"
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx ({reason}); layer-wise "
            "execution needs a forward without control flow on tensor values"
        ) from None
    return fx.GraphModule(tracer.root, graph)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _meta_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """``m``'s tensors on the meta device; integer buffers (batch counters, read as numbers
    by a training forward) as real copies."""
    state = m.state_dict(keep_vars=True)
    return {
        k: torch.empty_like(v, device="meta") if v.is_floating_point() else v.detach().clone()
        for k, v in state.items()
    }


class _MetaRun(fx.Interpreter):
    """Runs the graph on the meta device, parameters included, recording every value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        return torch.func.functional_call(m, _meta_state(m), args, kwargs)

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)
        return _on_meta(value) if isinstance(value, torch.Tensor) else value


def _where(node: fx.Node) -> str:
    return f"'{node.target}'" if node.op == "call_module" else f"{node.op} {node.name}"


def _refuse(node: fx.Node, reason: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"{_where(node)}: {reason}")


def _func(node: fx.Node) -> Any:
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return node.target


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    return node.target in _INPLACE_FUNCS or node.kwargs.get("inplace") is True


def _image_step(node: fx.Node, values: dict, images: list[fx.Node], gm: fx.GraphModule,
                n: int) -> Step:  # fmt: skip
    """A node computed from the image: its kind, geometry and rules."""
    out = values[node]
    step = Step(node, "pointwise", tuple(out.shape), out.dtype, images=images)
    first = values[images[0]]
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        step.module = m
        if len(images) != 1 or len(node.args) != 1 or node.kwargs:
            raise _refuse(node, "a layer called with more than its input is not supported")
        try:
            step.geometry = layer_geometry(m, n)
            found = layer_entry(m)
        except Unsupported as e:
            raise _refuse(node, str(e)) from None
        step.execution = found[1].execution if found else None
    else:
        func = _func(node)
        if node.op == "call_method" and str(node.target) in _MOVES:
            raise _refuse(node, f".{node.target}() moves voxels between positions")
        if func in (torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.stack):
            raise _refuse(node, f"{node.target} moves voxels between positions")
        if func is operator.getitem:
            _check_index(node)
        try:
            meta_args = fx.map_arg((node.args, node.kwargs), lambda a: values[a])
            step.geometry = call_geometry(func, *meta_args, n)
        except Unsupported as e:
            raise _refuse(node, str(e)) from None
    step.inplace = _is_inplace(node, step.module)
    kind = step.geometry.kind if step.geometry is not None else "pointwise"
    if kind == "global":
        if step.execution not in ("batch_norm", "instance_norm", "group_norm"):
            raise _refuse(node, step.geometry.reason + "; only normalisation is supported")
        step.kind = "norm"
    elif kind == "local":
        if step.geometry.periodic:
            raise _refuse(node, "circular padding wraps around the image")
        step.kind = "local"
        step.rules = step.geometry.axis_rules(list(first.shape[2:]))
    elif kind == "composite":
        raise _refuse(node, "a composite module was kept whole by the tracer")
    else:
        _check_pointwise(node, step, [values[i] for i in images])
    return step


def _check_index(node: fx.Node) -> None:
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    spatial = index[2:]
    if any(i is Ellipsis for i in index[:2]) or any(i != slice(None) for i in spatial):
        raise _refuse(node, f"indexing {index} reaches into the spatial dimensions")


def _check_pointwise(node: fx.Node, step: Step, inputs: Sequence[torch.Tensor]) -> None:
    n = len(step.shape) - 2
    for t in inputs:
        spatial = tuple(t.shape[2:])
        if t.dim() != n + 2 or any(s not in (o, 1) for s, o in zip(spatial, step.shape[2:])):
            raise _refuse(
                node,
                f"maps spatial shape {spatial} to {step.shape[2:]}; only operations with "
                "geometry rules may change it (convolution, pooling, interpolation, padding)",
            )


def plan_steps(model: nn.Module, shape: Sequence[int], dtype: torch.dtype) -> list[Step]:
    """The steps of ``model`` on an image of ``shape`` (N, C, *spatial), in graph order, each
    step's ``images`` naming the values it reads once in-place operations are taken as new
    values (``haloseg.layerwise.alias``)."""
    n = len(shape) - 2
    gm = trace(model, shape, dtype)
    run = _MetaRun(gm)
    x = torch.empty(tuple(shape), dtype=dtype, device="meta")
    try:
        traced = run.run(x)
    except Exception as e:
        reason = _first_line(e)
        raise UnsupportedLayerError(
            f"{type(model).__name__} as traced by torch.fx does not run on shape "
            f"{tuple(shape)} ({reason}); its forward likely branches on tensor types or "
            "shapes, which tracing cannot follow"
        ) from None
    values = run.values
    _check_same_as_eager(model, x, traced)
    from_image: set[fx.Node] = set()
    steps: list[Step] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if from_image:
                raise _refuse(node, "layer-wise execution takes one input image")
            from_image.add(node)
            steps.append(Step(node, "input", tuple(shape), dtype))
            continue
        if node.op == "output":
            steps.append(Step(node, "output"))
            continue
        if not any(a in from_image for a in node.all_input_nodes):
            value = _fetch(gm, str(node.target)) if node.op == "get_attr" else None
            steps.append(Step(node, "const", module=_module_of(gm, node), value=value))
            continue
        from_image.add(node)
        value = values[node]
        if not isinstance(value, torch.Tensor):
            if any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(value)):
                raise _refuse(node, "an operation returning several tensors is not supported")
            steps.append(Step(node, "meta", value=value))
            continue
        if value.dim() != n + 2:
            raise _refuse(node, f"turns the image into a tensor of shape {tuple(value.shape)}")
        images = [a for a in node.all_input_nodes if isinstance(values.get(a), torch.Tensor)
                  and a in from_image]  # fmt: skip
        steps.append(_image_step(node, values, images, gm, n))
    from haloseg.layerwise.alias import functionalise  # it reads Steps: imported late

    functionalise(steps)
    return steps


def _check_same_as_eager(model: nn.Module, x: torch.Tensor, traced: Any) -> None:
    """Refuse a trace whose output shapes differ from the module's own (a branch on a
    tensor's type or shape that tracing took the other way)."""
    eager = torch.func.functional_call(model, _meta_state(model), (x,))

    def shapes(tree: Any) -> list[Any]:
        leaves = torch.utils._pytree.tree_leaves(tree)
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves]

    if shapes(eager) != shapes(traced):
        raise UnsupportedLayerError(
            f"{type(model).__name__} traced by torch.fx gives outputs {shapes(traced)} where "
            f"its forward gives {shapes(eager)}; its forward branches on tensor types or shapes"
        )


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None
